// Expert-parallel communication: a small communicator interface with three implementations.
//
//   NCCL        wraps an ncclComm_t the caller made (e.g. the PyTorch front-end), or one
//               bootstrapped by fp8flow (MPI in the C++ tools; a unique id the caller broadcasts
//               otherwise).
//               Data on the Cuda device; collectives are asynchronous on the given stream.
//               Non-blocking NCCL with a timeout: a peer that dies or never arrives makes the call
//               throw fp8flow::Error(ErrorKind::Comm) after `timeout_ms` (the communicator is
//               aborted and unusable afterwards) instead of hanging.
//   InProcess   N simulated ranks in one process, one thread per rank, host (Cpu) memory: what the
//               CPU test suite uses to run dispatch/combine and the layer with EP > 1 without NCCL.
//               Collectives rendezvous between the N threads; a rank that does not arrive within
//               the timeout makes the others throw ErrorKind::Comm, and so does a rank that
//               throws anything (in a collective, even InvalidArgument, or in its own code) or
//               returns while others wait for it: the group is aborted at once, no waiting.
//
// Collectives (all ranks call them in the same order, as with NCCL):
//   all_to_all_v  bytes: rank i sends send_bytes[j] bytes from send + send_offsets[j] to rank j,
//                 and receives recv_bytes[j] bytes from rank j at recv + recv_offsets[j]. Counts
//                 and offsets are host arrays of size() entries; the caller knows recv_bytes (from
//                 a counts exchange). Grouped point-to-point send/recv under NCCL.
//                 Offsets/counts are validated locally (size() entries, >= 0, non-null buffers
//                 when bytes move: InvalidArgument). InProcess also checks that every rank's
//                 recv_bytes[j] equals what rank j sends (Comm error naming both ranks) and that
//                 receive ranges do not overlap; NCCL cannot check across ranks (a mismatch ends
//                 in an NCCL error or the timeout). InProcess copies synchronously; NCCL is
//                 asynchronous on `stream` (buffers must stay valid until the stream passes it).
//   all_to_all_segments
//                 one group of point-to-point transfers: each send segment moves `bytes` bytes
//                 from its `data` to rank `peer`, each receive segment receives `bytes` bytes from
//                 rank `peer` into its `data` (any addresses: a segment names its own buffer).
//                 Zero-byte segments are ignored. The sends of rank i to rank j are matched with
//                 the receives of rank j from rank i in list order (the k-th non-empty with the
//                 k-th non-empty), so both sides must list them in the same order and with the
//                 same sizes; several segments per peer are allowed (what the in-place dispatch
//                 uses to land each (peer, expert) block straight in its final place). Grouped
//                 ncclSend/ncclRecv under NCCL (which runs a peer pair's transfers in order).
//                 Validated locally like all_to_all_v (peer in [0, size()), bytes >= 0, non-null
//                 data when bytes move, receive ranges that do not overlap: InvalidArgument).
//                 InProcess also checks across ranks that every rank's k-th receive from j has the
//                 size of j's k-th send to it and that the counts agree (Comm error naming both
//                 ranks); NCCL cannot (a mismatch ends in an NCCL error or the timeout).
//                 Synchronous on InProcess, asynchronous on `stream` under NCCL.
//   all_gather    a small host int64 vector per rank, the same count on every rank -> the
//                 concatenation of all ranks' vectors (rank order). Synchronizes the host (it is
//                 for counts and config checks). A rank passing another count: Comm error.
//   barrier       host synchronization of all ranks.
// Errors: fp8flow::Error naming "fp8flow::Communicator::<call>", the argument, expected and got.
// After a Comm error (timeout, a peer failed, NCCL error) the communicator is unusable: every
// later call throws ErrorKind::Comm with the first reason. Under NCCL a watchdog thread times
// each collective from when it starts on the GPU; on timeout it aborts an owned communicator,
// which also releases a caller blocked in cudaStreamSynchronize behind the stuck collective.
// Thread safety: one communicator is used by one thread at a time.
#pragma once

#include <cstdint>
#include <functional>
#include <memory>
#include <span>
#include <vector>

#include "fp8flow/types.h"

namespace fp8flow {

// One point-to-point transfer of all_to_all_segments.
// Sends read `data`; receives write it.
struct CommSegment {
  int peer = 0;          // the rank sent to / received from
  void* data = nullptr;  // the segment's first byte
  int64_t bytes = 0;     // 0: ignored
};

class Communicator {
 public:
  virtual ~Communicator() = default;
  virtual int rank() const = 0;
  virtual int size() const = 0;
  // Where the buffers passed to all_to_all_v live: Cpu (InProcess) or Cuda (NCCL).
  virtual Device device() const = 0;
  virtual const char* backend() const = 0;  // "nccl" or "inprocess"

  virtual void all_to_all_v(const void* send, std::span<const int64_t> send_bytes,
                            std::span<const int64_t> send_offsets, void* recv,
                            std::span<const int64_t> recv_bytes,
                            std::span<const int64_t> recv_offsets, Stream stream) = 0;
  virtual void all_to_all_segments(std::span<const CommSegment> sends,
                                   std::span<const CommSegment> recvs, Stream stream) = 0;
  virtual std::vector<int64_t> all_gather(std::span<const int64_t> mine, Stream stream) = 0;
  virtual void barrier(Stream stream) = 0;

  // Internal: persistent resources of ops built on this communicator (the pipelined dispatch's
  // side stream and events), created by the op on first use and released with the communicator.
  std::shared_ptr<void>& op_state() { return op_state_; }

 private:
  std::shared_ptr<void> op_state_;
};

// Checks that every rank passes the same values (e.g. a config's fields); throws
// fp8flow::Error(ErrorKind::Comm) naming `what` and the first rank that differs. Collective.
void check_same_on_all_ranks(Communicator& comm, std::span<const int64_t> values, const char* what,
                             Stream stream = nullptr);

// ---- InProcess (simulated ranks) --------------------------------------------------------------
// Runs fn(comm) on `ranks` threads, one communicator per rank, and joins them. An exception in
// any rank is re-thrown on the caller's thread after all threads have stopped (the others are
// released from their pending collective with ErrorKind::Comm). timeout_ms bounds every rendezvous.
void run_in_process(int ranks, const std::function<void(Communicator&)>& fn,
                    int64_t timeout_ms = 60000);

// ---- NCCL -------------------------------------------------------------------------------------
// Opaque NCCL types without including nccl.h.
struct NcclUniqueIdBytes {
  unsigned char bytes[128];
};
// A new unique id (call on one rank; distribute its bytes to all ranks by any means).
NcclUniqueIdBytes nccl_unique_id();
// Makes a non-blocking NCCL communicator on the current CUDA device (owned; destroyed with the
// returned object).
std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueIdBytes& id, int rank,
                                                     int size, int64_t timeout_ms = 120000);
// Wraps an existing ncclComm_t (passed as void*; not owned, never destroyed nor aborted: on a
// timeout the wrapper fails and throws, and the owner must ncclCommAbort it). If it was made
// blocking, the timeout cannot interrupt NCCL calls that block (documented limitation). Use it on
// the communicator's device (rank/size/device are read from it).
std::unique_ptr<Communicator> wrap_nccl_communicator(void* nccl_comm, int64_t timeout_ms = 120000);
// MPI bootstrap for the C++ tools (`mpirun -np N ...`): rank/size from MPI_COMM_WORLD, the unique
// id broadcast by MPI, device = local rank. Available when built with FP8FLOW_WITH_MPI; otherwise
// throws ErrorKind::Unsupported.
std::unique_ptr<Communicator> make_nccl_communicator_mpi(int64_t timeout_ms = 120000);
bool built_with_nccl();
bool built_with_mpi();

}  // namespace fp8flow
