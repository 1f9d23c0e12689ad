// fp8flow umbrella header: the whole public C++ API.
#pragma once

#include "fp8flow/formats.h"
#include "fp8flow/gemm.h"
#include "fp8flow/moe.h"
#include "fp8flow/mxfp4.h"
#include "fp8flow/permute.h"
#include "fp8flow/quantize.h"
#include "fp8flow/router.h"
#include "fp8flow/swiglu.h"
#include "fp8flow/transpose.h"
#include "fp8flow/types.h"
#include "fp8flow/version.h"
