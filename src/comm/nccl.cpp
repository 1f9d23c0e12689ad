// NCCL communicator (stub until implemented).
#include "common/check.h"
#include "fp8flow/comm.h"

namespace fp8flow {

#if 1  // the NCCL implementation follows in the next commit
namespace {
[[noreturn]] void no_nccl(const char* fn) {
  throw Error(
      ErrorKind::Unsupported,
      detail::cat("fp8flow::", fn, ": fp8flow was built without NCCL (FP8FLOW_WITH_NCCL=OFF)"));
}
}  // namespace
bool built_with_nccl() {
  return false;
}
NcclUniqueIdBytes nccl_unique_id() {
  no_nccl("nccl_unique_id");
}
std::unique_ptr<Communicator> make_nccl_communicator(const NcclUniqueIdBytes&, int, int, int64_t) {
  no_nccl("make_nccl_communicator");
}
std::unique_ptr<Communicator> wrap_nccl_communicator(void*, int64_t) {
  no_nccl("wrap_nccl_communicator");
}
#endif

}  // namespace fp8flow
