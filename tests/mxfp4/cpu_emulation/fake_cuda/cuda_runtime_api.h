// Fake CUDA runtime API (see cuda_runtime.h beside it).
#pragma once
#include "cuda_runtime.h"
