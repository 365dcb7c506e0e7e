// The kernels compiled for the portable x86-64 baseline (whatever flags the extension is built with).
#include <cstdint>
#include <cstdlib>

#include "kernels.h"

namespace fastbert {
namespace base {
#include "kernels_dropout.h"
#include "kernels_impl.h"
}  // namespace base
}  // namespace fastbert
