// fp8flow-bench: the rank setup shared by the multi-GPU subcommands (comm, layer --ep N). A rank
// is a Communicator plus the stream it launches on; the subcommand gives one function that runs
// on every rank, and one of these runs it:
//   run_ranks_threads   one process, one thread per GPU (rank r on GPU r, its own non-blocking
//                       stream and NCCL communicator from a shared unique id);
//   run_ranks_mpi       one process per GPU under mpirun (NCCL communicator from MPI; the device
//                       is picked by make_nccl_communicator_mpi from the local rank);
//   run_ranks_inprocess simulated ranks on the CPU (InProcess communicator, stream nullptr).
// Each returns how many ranks failed (threads / in-process: all ranks; mpirun: this process) and
// prints every failed rank's error on stderr as "<tool>: rank R: <what>".
#pragma once

#include <cstdint>
#include <functional>

#include "fp8flow/comm.h"

namespace fp8flow::bench {

// NCCL communicator timeout for the bench's ranks (a hung peer turns into an error, not a hang).
constexpr int64_t kRankTimeoutMs = 120000;

using RankFn = std::function<void(Communicator& comm, Stream stream)>;

// Started by mpirun (Open MPI, MPICH/PMI or PMIx environment variables).
bool under_mpirun();
// Under mpirun: whether mpirun mode (one rank per GPU, NCCL bootstrapped over MPI) can run here
// (`gpus`: a usable CUDA device). If not, says on stderr what is missing and to run
// `fp8flow-bench <sub> <alt_flag> N` without mpirun instead, and returns false.
bool mpirun_mode_available(const char* sub, const char* alt_flag, bool gpus);
// Visible CUDA devices (0 without CUDA).
int gpu_count();

// Stall monitor of run_ranks_threads: each rank reports what it is doing (`what`: a string
// literal, `n`: a counter such as the step, -1 for none). When no rank has reported anything new
// for $FP8FLOW_BENCH_STALL_S seconds (default 300; 0 turns it off), the monitor prints every
// rank's last report and how long ago it came, then ends the process with exit status 3: a hang
// (a deadlock the communicator's watchdog cannot see, e.g. on the host) becomes a diagnosis. The
// other modes ignore the reports, and so does a run in which no rank has reported yet.
void rank_progress(int rank, const char* what, int64_t n = -1);

int run_ranks_threads(int ranks, const RankFn& fn, const char* tool);
// `rank` (may be null) gets this process's rank (-1 if the communicator could not be made).
int run_ranks_mpi(const RankFn& fn, const char* tool, int* rank = nullptr);
int run_ranks_inprocess(int ranks, const RankFn& fn, const char* tool);

}  // namespace fp8flow::bench
