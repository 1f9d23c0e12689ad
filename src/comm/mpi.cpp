// MPI bootstrap (stub until implemented).
#include "common/check.h"
#include "fp8flow/comm.h"

namespace fp8flow {

#if 1  // the MPI bootstrap follows in a later commit
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
