// MPI bootstrap of the NCCL communicator for the C++ tools (`mpirun -np N fp8flow-bench comm`):
// rank and size from MPI_COMM_WORLD, one GPU per local rank, the NCCL unique id broadcast by MPI.
// MPI only bootstraps; all data moves through NCCL.
//
// MPI is initialized here if the program has not done it (and finalized at exit by a static
// guard); the broadcast of the id is non-blocking and polled with the timeout, so a rank that never
// arrives makes the others throw instead of hanging.
#include <memory>

#include "common/check.h"
#include "fp8flow/comm.h"

#if FP8FLOW_WITH_MPI
#include <cuda_runtime_api.h>
// The C API only: without these, C++ mpi.h pulls in the (removed-from-MPI-3) C++ bindings.
#define OMPI_SKIP_MPICXX 1
#define MPICH_SKIP_MPICXX 1
#include <mpi.h>

#include <chrono>
#include <cstdlib>
#include <string>
#include <thread>
#endif

namespace fp8flow {

#if FP8FLOW_WITH_MPI

namespace {

using detail::cat;

std::string mpi_text(int code) {
  char buf[MPI_MAX_ERROR_STRING];
  int len = 0;
  if (MPI_Error_string(code, buf, &len) != MPI_SUCCESS) return cat("MPI error ", code);
  return std::string(buf, len);
}

void mpi_check(int code, const char* what) {
  if (code != MPI_SUCCESS)
    throw Error(ErrorKind::Comm,
                cat("fp8flow::make_nccl_communicator_mpi: ", what, ": ", mpi_text(code)));
}

// Initializes MPI once (unless the program did) and finalizes it at exit if we initialized it.
class MpiSession {
 public:
  MpiSession() {
    int init = 0;
    MPI_Initialized(&init);
    if (!init) {
      int provided = 0;
      mpi_check(MPI_Init_thread(nullptr, nullptr, MPI_THREAD_SERIALIZED, &provided), "MPI_Init");
      owned_ = true;
    }
    // Errors come back as codes (and become fp8flow::Error) instead of aborting the job.
    MPI_Comm_set_errhandler(MPI_COMM_WORLD, MPI_ERRORS_RETURN);
  }
  ~MpiSession() {
    int fin = 0;
    MPI_Finalized(&fin);
    if (owned_ && !fin) MPI_Finalize();
  }
  MpiSession(const MpiSession&) = delete;
  MpiSession& operator=(const MpiSession&) = delete;

 private:
  bool owned_ = false;
};

void ensure_mpi() {
  static MpiSession session;  // constructed on first use, destroyed (MPI_Finalize) at exit
}

// This process's rank among the ranks on its node.
void local_rank_and_size(int& local_rank, int& local_size) {
  const char* lr = std::getenv("OMPI_COMM_WORLD_LOCAL_RANK");
  const char* ls = std::getenv("OMPI_COMM_WORLD_LOCAL_SIZE");
  if (lr && ls) {
    local_rank = std::atoi(lr);
    local_size = std::atoi(ls);
    return;
  }
  int world_rank = 0;
  mpi_check(MPI_Comm_rank(MPI_COMM_WORLD, &world_rank), "MPI_Comm_rank");
  MPI_Comm node;
  mpi_check(
      MPI_Comm_split_type(MPI_COMM_WORLD, MPI_COMM_TYPE_SHARED, world_rank, MPI_INFO_NULL, &node),
      "MPI_Comm_split_type");
  MPI_Comm_rank(node, &local_rank);
  MPI_Comm_size(node, &local_size);
  MPI_Comm_free(&node);
}

}  // namespace

bool built_with_mpi() {
  return true;
}

std::unique_ptr<Communicator> make_nccl_communicator_mpi(int64_t timeout_ms) {
  detail::Check check("make_nccl_communicator_mpi");
  check.that(timeout_ms > 0, "timeout_ms", "> 0", cat(timeout_ms));
  ensure_mpi();
  int rank = 0, size = 0;
  mpi_check(MPI_Comm_rank(MPI_COMM_WORLD, &rank), "MPI_Comm_rank");
  mpi_check(MPI_Comm_size(MPI_COMM_WORLD, &size), "MPI_Comm_size");
  int local_rank = 0, local_size = 1;
  local_rank_and_size(local_rank, local_size);
  int devices = 0;
  const cudaError_t e = cudaGetDeviceCount(&devices);
  if (e != cudaSuccess || devices == 0)
    throw Error(ErrorKind::Cuda,
                cat("fp8flow::make_nccl_communicator_mpi: rank ", rank, ": no CUDA device (",
                    e == cudaSuccess ? "0 devices" : cudaGetErrorString(e), ")"));
  if (local_size > devices)
    throw Error(ErrorKind::Comm,
                cat("fp8flow::make_nccl_communicator_mpi: rank ", rank, ": ", local_size,
                    " ranks on this node but only ", devices,
                    " CUDA devices (one GPU per rank; use mpirun -np <= ", devices, ")"));
  const cudaError_t se = cudaSetDevice(local_rank);
  if (se != cudaSuccess)
    throw Error(ErrorKind::Cuda,
                cat("fp8flow::make_nccl_communicator_mpi: rank ", rank, ": cudaSetDevice(",
                    local_rank, "): ", cudaGetErrorString(se)));
  NcclUniqueIdBytes id{};
  if (rank == 0) id = nccl_unique_id();
  // Non-blocking broadcast polled against the timeout.
  MPI_Request req;
  mpi_check(MPI_Ibcast(id.bytes, sizeof(id.bytes), MPI_BYTE, 0, MPI_COMM_WORLD, &req),
            "MPI_Ibcast");
  const auto deadline = std::chrono::steady_clock::now() + std::chrono::milliseconds(timeout_ms);
  for (;;) {
    int done = 0;
    mpi_check(MPI_Test(&req, &done, MPI_STATUS_IGNORE), "MPI_Test");
    if (done) break;
    if (std::chrono::steady_clock::now() >= deadline)
      throw Error(ErrorKind::Comm,
                  cat("fp8flow::make_nccl_communicator_mpi: rank ", rank, " of ", size,
                      ": the NCCL unique id did not arrive from rank 0 "
                      "within ",
                      timeout_ms, " ms (timeout)"));
    std::this_thread::sleep_for(std::chrono::microseconds(200));
  }
  return make_nccl_communicator(id, rank, size, timeout_ms);
}

#else  // !FP8FLOW_WITH_MPI

bool built_with_mpi() {
  return false;
}
std::unique_ptr<Communicator> make_nccl_communicator_mpi(int64_t) {
  throw Error(ErrorKind::Unsupported,
              "fp8flow::make_nccl_communicator_mpi: fp8flow was built without MPI "
              "(FP8FLOW_WITH_MPI=OFF)");
}

#endif

}  // namespace fp8flow
