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

int run_ranks_threads(int ranks, const RankFn& fn, const char* tool);
// `rank` (may be null) gets this process's rank (-1 if the communicator could not be made).
int run_ranks_mpi(const RankFn& fn, const char* tool, int* rank = nullptr);
int run_ranks_inprocess(int ranks, const RankFn& fn, const char* tool);

}  // namespace fp8flow::bench
