// Host-side argument checking shared by every op: FP8FLOW_CHECK and the validators that build
// "fp8flow::<op>: <arg>: expected <x>, got <y>" messages. Checks run before any launch, never in
// kernels.
#pragma once

#include <initializer_list>
#include <sstream>
#include <string>

#include "fp8flow/types.h"

namespace fp8flow::detail {

[[noreturn]] void throw_error(ErrorKind kind, const std::string& msg);

template <typename... A>
std::string cat(const A&... a) {
  std::ostringstream os;
  (os << ... << a);
  return os.str();
}

// Largest dimension and element count fp8flow accepts (kernels index rows/cols with 32-bit ints).
constexpr int64_t kMaxDim = (int64_t{1} << 31) - 1;
constexpr int64_t kMaxNumel = int64_t{1} << 40;
// Most column groups (experts) a grouped op accepts.
constexpr int kMaxGroups = 1024;

// Validator bound to one op name; each method throws fp8flow::Error on failure.
class Check {
 public:
  explicit Check(const char* op) : op_(op) {}

  [[noreturn]] void fail(ErrorKind kind, const std::string& arg, const std::string& msg) const;
  void that(bool cond, const std::string& arg, const std::string& expected, const std::string& got,
            ErrorKind kind = ErrorKind::InvalidArgument) const {
    if (!cond) fail(kind, arg, cat("expected ", expected, ", got ", got));
  }

  // Well-formed view: sizes >= 0 and within limits, ld >= cols, data non-null unless empty,
  // dtype among `dtypes` (empty list: any).
  void view(const TensorView& t, const std::string& arg,
            std::initializer_list<DType> dtypes = {}) const;
  void shape(const TensorView& t, const std::string& arg, int64_t rows, int64_t cols) const;
  void dtype(const TensorView& t, const std::string& arg,
             std::initializer_list<DType> dtypes) const;
  void same_device(const TensorView& a, const std::string& arg_a, const TensorView& b,
                   const std::string& arg_b) const;
  void cols_multiple(const TensorView& t, const std::string& arg, int64_t m) const;
  void contiguous(const TensorView& t, const std::string& arg) const;
  // Data pointer and row pitch aligned to `bytes` (for vector loads/stores on the device).
  void aligned(const TensorView& t, const std::string& arg, size_t bytes) const;
  // A scaled tensor: data dtype in `data_dtypes`, layout as given, scale dtype/shape consistent
  // with the layout, col_groups valid, scale on the data's device, scale contiguous.
  void scaled(const ScaledTensor& t, const std::string& arg, ScaleLayout layout,
              std::initializer_list<DType> data_dtypes) const;
  void groups(std::span<const int64_t> groups, const std::string& arg, int64_t total) const;

  const char* op() const { return op_; }

 private:
  const char* op_;
};

std::string dtype_list(std::initializer_list<DType> dtypes);

}  // namespace fp8flow::detail

#define FP8FLOW_CHECK(cond, kind, msg)                                            \
  do {                                                                            \
    if (!(cond)) ::fp8flow::detail::throw_error(::fp8flow::ErrorKind::kind, msg); \
  } while (0)
