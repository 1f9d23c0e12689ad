// Host-side validators (src/common/check.h): every message names op, argument, expected, actual.
#include "common/check.h"

#include "common/groups.h"

namespace fp8flow::detail {

void throw_error(ErrorKind kind, const std::string& msg) {
  throw Error(kind, msg);
}

std::string dtype_list(std::initializer_list<DType> dtypes) {
  std::string s;
  for (DType d : dtypes) {
    if (!s.empty()) s += " or ";
    s += to_string(d);
  }
  return s;
}

void Check::fail(ErrorKind kind, const std::string& arg, const std::string& msg) const {
  throw Error(kind, cat("fp8flow::", op_, ": ", arg, ": ", msg));
}

void Check::dtype(const TensorView& t, const std::string& arg,
                  std::initializer_list<DType> dtypes) const {
  if (dtypes.size() == 0) return;
  for (DType d : dtypes)
    if (t.dtype == d) return;
  fail(ErrorKind::InvalidArgument, arg,
       cat("expected dtype ", dtype_list(dtypes), ", got ", to_string(t.dtype)));
}

void Check::view(const TensorView& t, const std::string& arg,
                 std::initializer_list<DType> dtypes) const {
  dtype(t, arg, dtypes);
  that(t.rows >= 0 && t.cols >= 0, arg, "non-negative shape", cat("[", t.rows, ", ", t.cols, "]"));
  that(t.rows <= kMaxDim && t.cols <= kMaxDim && t.rows * t.stride() <= kMaxNumel, arg,
       cat("each dim <= ", kMaxDim, " and rows * ld <= 2^40"),
       cat("[", t.rows, ", ", t.cols, "] with ld ", t.stride()));
  that(t.ld < 0 || t.ld >= t.cols, arg, cat("ld >= cols (", t.cols, ")"), cat("ld ", t.ld));
  if (t.dtype == DType::E2M1x2) {
    that(t.cols % 2 == 0 && t.stride() % 2 == 0, arg, "even cols and ld for packed E2M1x2",
         cat("cols ", t.cols, ", ld ", t.stride()));
  }
  that(t.data != nullptr || t.numel() == 0, arg, "a non-null data pointer", "nullptr");
  that(t.device == Device::Cpu || t.device == Device::Cuda, arg, "device Cpu or Cuda",
       cat("device ", static_cast<int>(t.device)));
}

void Check::shape(const TensorView& t, const std::string& arg, int64_t rows, int64_t cols) const {
  that(t.rows == rows && t.cols == cols, arg, cat("shape [", rows, ", ", cols, "]"),
       cat("[", t.rows, ", ", t.cols, "]"));
}

void Check::same_device(const TensorView& a, const std::string& arg_a, const TensorView& b,
                        const std::string& arg_b) const {
  that(a.device == b.device, arg_b, cat("device ", to_string(a.device), " (as ", arg_a, ")"),
       to_string(b.device));
}

void Check::cols_multiple(const TensorView& t, const std::string& arg, int64_t m) const {
  that(t.cols % m == 0, arg, cat("cols divisible by ", m), cat(t.cols));
}

void Check::contiguous(const TensorView& t, const std::string& arg) const {
  that(t.ld < 0 || t.ld == t.cols, arg, cat("contiguous rows (ld == cols == ", t.cols, ")"),
       cat("ld ", t.ld));
}

void Check::aligned(const TensorView& t, const std::string& arg, size_t bytes) const {
  const auto addr = reinterpret_cast<uintptr_t>(t.data);
  that(addr % bytes == 0, arg, cat("data pointer aligned to ", bytes, " bytes"),
       cat("address ending 0x", std::hex, addr % 256));
  that(t.row_bytes() % bytes == 0, arg, cat("row pitch a multiple of ", bytes, " bytes"),
       cat(t.row_bytes(), " bytes"));
}

void Check::groups(std::span<const int64_t> groups, const std::string& arg, int64_t total) const {
  if (groups.empty()) return;
  that(groups.size() <= static_cast<size_t>(kMaxGroups), arg,
       cat("at most ", kMaxGroups, " groups"), cat(groups.size()));
  int64_t sum = 0;
  for (size_t i = 0; i < groups.size(); ++i) {
    if (groups[i] < 0)  // the message only on failure: this runs per group of every call
      that(false, cat(arg, "[", i, "]"), "a non-negative size", cat(groups[i]));
    sum += groups[i];
  }
  that(sum == total, arg, cat("sizes summing to ", total), cat("sum ", sum));
}

void Check::scaled(const ScaledTensor& t, const std::string& arg, ScaleLayout layout,
                   std::initializer_list<DType> data_dtypes) const {
  that(t.layout == layout, arg + ".layout", to_string(layout), to_string(t.layout));
  view(t.data, arg + ".data", data_dtypes);
  const DType sdt = layout == ScaleLayout::Mx1x32 ? DType::E8M0 : DType::F32;
  view(t.scale, arg + ".scale", {sdt});
  same_device(t.data, arg + ".data", t.scale, arg + ".scale");
  contiguous(t.scale, arg + ".scale");
  if (layout == ScaleLayout::Mx1x32) cols_multiple(t.data, arg + ".data", 32);
  if (layout == ScaleLayout::Rowwise1x128) {
    groups(t.col_groups, arg + ".col_groups", t.data.cols);
  } else {
    that(t.col_groups.empty(), arg + ".col_groups", "empty (groups apply to Rowwise1x128 only)",
         cat(t.col_groups.size(), " groups"));
  }
  const Shape2D s = scale_shape(layout, t.data.rows, t.data.cols, t.col_groups);
  shape(t.scale, arg + ".scale", s.rows, s.cols);
}

GroupTiles make_group_tiles(std::span<const int64_t> groups, int64_t cols) {
  GroupTiles g;
  if (groups.empty()) {
    g.num_groups = 1;
    g.col_start[0] = 0;
    g.col_start[1] = static_cast<int32_t>(cols);
    g.tile_start[0] = 0;
    g.tile_start[1] = static_cast<int32_t>((cols + 127) / 128);
  } else {
    g.num_groups = static_cast<int32_t>(groups.size());
    int64_t c = 0, t = 0;
    for (size_t i = 0; i < groups.size(); ++i) {
      g.col_start[i] = static_cast<int32_t>(c);
      g.tile_start[i] = static_cast<int32_t>(t);
      c += groups[i];
      t += (groups[i] + 127) / 128;
    }
    g.col_start[groups.size()] = static_cast<int32_t>(c);
    g.tile_start[groups.size()] = static_cast<int32_t>(t);
  }
  g.total_tiles = g.tile_start[g.num_groups];
  return g;
}

}  // namespace fp8flow::detail
