// mm: FaultMode::kInThread.  The managed userfaultfd is opened with
// UFFD_FEATURE_SIGBUS, so a fault on a missing managed page raises SIGBUS
// in the faulting thread instead of queueing a message for a service
// thread; uhmm's handler serves the fault right there and returns, and the
// access is retried.  This saves the hand-off to a service thread (the
// larger part of a fault's latency, docs/performance.md), at the price that
// the kernel can no longer serve its own accesses: a syscall touching a
// missing page gets EFAULT (AddressSpace::read/write fault pages in first).
// Trade-offs and rules for applications: docs/adr/0004-in-thread-faults.md.
//
// The handler is process-wide; in-thread address spaces are listed in a
// fixed table of atomic pointers that the handler scans without locks.
#include <signal.h>
#include <ucontext.h>
#include <unistd.h>

#include <atomic>
#include <cerrno>
#include <chrono>
#include <mutex>
#include <memory>
#include <thread>
#include <vector>

#include "core/assert.hpp"
#include "mm/address_space_impl.hpp"
#include "platform/threads.hpp"

namespace uhmm {

using mm::PageEntry;

namespace {

constexpr int kMaxInThreadSpaces = 64;

std::atomic<AddressSpace::Impl*> g_spaces[kMaxInThreadSpaces];
/// Handlers between reading g_spaces and finishing with the Impl they found;
/// unregistering waits for 0 so an Impl is never used after it is gone.
std::atomic<int> g_handlers_running{0};

std::mutex g_install_mutex;
/// The SIGBUS action uhmm's handler replaced, immutable once published (an
/// old one is never freed: a handler on another thread may still read it).
std::atomic<const struct sigaction*> g_previous{nullptr};

bool is_write_fault(void* ucontext) {
#if defined(__x86_64__)
  // The page-fault error code: bit 1 is set for a write.
  const auto* uc = static_cast<const ucontext_t*>(ucontext);
  return uc != nullptr && (uc->uc_mcontext.gregs[REG_ERR] & 0x2) != 0;
#else
  (void)ucontext;
  return false;  // informational only (CpuFault::write)
#endif
}

// Hands a SIGBUS that is not uhmm's to whatever handled SIGBUS before.
void chain_to_previous(int sig, siginfo_t* info, void* ucontext) {
  const struct sigaction* previous = g_previous.load(std::memory_order_acquire);
  if (previous != nullptr && (previous->sa_flags & SA_SIGINFO)) {
    if (previous->sa_sigaction != nullptr) previous->sa_sigaction(sig, info, ucontext);
    return;
  }
  if (previous != nullptr && previous->sa_handler != SIG_DFL && previous->sa_handler != SIG_IGN) {
    previous->sa_handler(sig);
    return;
  }
  // The default action (an ignored SIGBUS from a fault is not ignorable
  // either): restore it; a faulting access re-executes and ends the process
  // with the right siginfo, a sent signal is raised again.
  struct sigaction dfl {};
  dfl.sa_handler = SIG_DFL;
  sigemptyset(&dfl.sa_mask);
  (void)::sigaction(sig, &dfl, nullptr);
  if (info == nullptr || info->si_code <= 0) (void)::raise(sig);
}

void on_sigbus(int sig, siginfo_t* info, void* ucontext) {
  const int saved_errno = errno;
  const bool served = handle_sigbus(sig, info, ucontext);
  errno = saved_errno;
  if (!served) chain_to_previous(sig, info, ucontext);
}

// Installs uhmm's handler unless it is the current one.  Called for every
// new in-thread address space, so that a handler the application installed
// since (or a fork child's own) is chained to rather than lost.
Status install_handler() {
  std::lock_guard lock(g_install_mutex);
  struct sigaction current {};
  if (::sigaction(SIGBUS, nullptr, &current) != 0)
    return Status::error(errno, "sigaction(SIGBUS): " + platform::errno_text(errno));
  if ((current.sa_flags & SA_SIGINFO) && current.sa_sigaction == on_sigbus) return Status::ok();
  // Publish the action to chain to before our handler can run.  Every one
  // stays allocated (and reachable, for leak checkers) for the process's life.
  static auto* const published = new std::vector<std::unique_ptr<struct sigaction>>;
  published->push_back(std::make_unique<struct sigaction>(current));
  g_previous.store(published->back().get(), std::memory_order_release);
  struct sigaction sa {};
  sa.sa_sigaction = on_sigbus;
  sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_RESTART;
  sigemptyset(&sa.sa_mask);
  if (::sigaction(SIGBUS, &sa, nullptr) != 0)
    return Status::error(errno, "sigaction(SIGBUS): " + platform::errno_text(errno));
  return Status::ok();
}

}  // namespace

bool handle_sigbus(int sig, siginfo_t* info, void* ucontext) {
  // A missing page of a SIGBUS-mode userfaultfd range reports BUS_ADRERR.
  // So does a poisoned page (a failed migrate_to_ram) on kernels without
  // CONFIG_MEMORY_FAILURE (BUS_MCEERR_AR with it): the page table tells.
  if (sig != SIGBUS || info == nullptr || info->si_code != BUS_ADRERR) return false;
  const VirtAddr addr = VirtAddr{reinterpret_cast<std::uintptr_t>(info->si_addr)}.page_down();
  const bool write = is_write_fault(ucontext);
  g_handlers_running.fetch_add(1, std::memory_order_seq_cst);
  using FaultResult = AddressSpace::Impl::FaultResult;
  FaultResult result = FaultResult::kNotManaged;
  for (auto& entry : g_spaces) {
    AddressSpace::Impl* impl = entry.load(std::memory_order_seq_cst);
    if (impl == nullptr) continue;
    try {
      result = impl->fault_in(addr, write);
    } catch (...) {
      // Nothing may unwind out of a signal handler: the access cannot
      // complete, so it ends like a device failure.
      impl->poison_or_wake(addr);
      result = FaultResult::kFailed;
    }
    if (result != FaultResult::kNotManaged) break;
  }
  g_handlers_running.fetch_sub(1, std::memory_order_seq_cst);
  // kFailed: the device could not bring the page back (now or earlier; the
  // page is poisoned).  That SIGBUS is the application's, with this siginfo,
  // as the kernel's own migrate_to_ram failure raises it.
  return result == FaultResult::kResolved;
}

Status AddressSpace::Impl::register_in_thread() {
  UHMM_TRY(install_handler());
  for (auto& entry : g_spaces) {
    AddressSpace::Impl* expected = nullptr;
    if (entry.compare_exchange_strong(expected, this, std::memory_order_seq_cst)) return Status::ok();
  }
  return Status::error(EMFILE, "too many in-thread address spaces in this process (at most 64)");
}

void AddressSpace::Impl::unregister_in_thread() {
  for (auto& entry : g_spaces) {
    AddressSpace::Impl* expected = this;
    if (entry.compare_exchange_strong(expected, nullptr, std::memory_order_seq_cst)) break;
  }
  // A handler may have loaded this Impl just before it was cleared.
  while (g_handlers_running.load(std::memory_order_seq_cst) != 0) std::this_thread::yield();
}

AddressSpace::Impl::FaultResult AddressSpace::Impl::fault_in(VirtAddr addr, bool write) {
  // Nothing here builds a Status: it runs in signal handlers.
  // The kernel built a page table for the address before it raised the
  // signal, outside a huge-fault window (faults through the userfaultfd:
  // read_messages).
  table.note_fault(addr.vpn(), huge_fault_epoch.load(std::memory_order_seq_cst));
  for (;;) {
    const FaultResult result = handle_fault(addr, write);
    if (result != FaultResult::kParked) return result;
    // A migration holds the entry.  With nobody asleep in the kernel there
    // is no wake-up to wait for: watch the entry.
    wait_entry_unlocked(addr);
  }
}

void AddressSpace::Impl::wait_entry_unlocked(VirtAddr addr) {
  mm::EntrySlot* slot = table.slot(addr.vpn(), false);
  if (slot == nullptr) return;
  entry_sleepers.fetch_add(1, std::memory_order_seq_cst);
  for (;;) {
    const std::uint32_t seen_wakeups = entry_wakeups.load(std::memory_order_seq_cst);
    std::uint64_t cur = slot->load(std::memory_order_seq_cst);
    if (!PageEntry{cur}.locked()) break;
    // The unlock of an entry marked kWaiters calls wake().
    if (!PageEntry{cur}.has_waiters() &&
        !slot->compare_exchange_strong(cur, cur | PageEntry::kWaiters, std::memory_order_seq_cst))
      continue;
    platform::futex_wait(entry_wakeups, seen_wakeups,
                         std::chrono::microseconds(entry_sleep_us.load(std::memory_order_relaxed)));
  }
  entry_sleepers.fetch_sub(1, std::memory_order_seq_cst);
}

}  // namespace uhmm
