// fp8flow version.
#pragma once

#define FP8FLOW_VERSION_MAJOR 0
#define FP8FLOW_VERSION_MINOR 1
#define FP8FLOW_VERSION_PATCH 0

namespace fp8flow {
// "0.1.0+cuda" or "0.1.0+cpu": which backends this build has.
const char* version_string();
}  // namespace fp8flow
