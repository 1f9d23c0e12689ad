// Fake CUDA runtime API for the CPU emulation check (see cuda_runtime.h beside it).
#pragma once
#include "cuda_runtime.h"
