// uhmm/uhmm.hpp: everything a driver or application needs.
#pragma once

#include "uhmm/address_space.hpp"
#include "uhmm/device_memory.hpp"
#include "uhmm/file_cache.hpp"
#include "uhmm/hmm.hpp"
#include "uhmm/migrate.hpp"
#include "uhmm/notifier.hpp"
#include "uhmm/sim_device.hpp"
#include "uhmm/stats.hpp"
#include "uhmm/status.hpp"
#include "uhmm/types.hpp"
