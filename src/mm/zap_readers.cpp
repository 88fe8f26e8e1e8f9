// mm: per-CPU readers of uhmm's own zap events (zap_readers.hpp).
#include "mm/zap_readers.hpp"

#include <poll.h>
#include <sched.h>
#include <sys/eventfd.h>
#include <unistd.h>

#include <cerrno>
#include <cstdint>
#include <cstdio>
#include <system_error>

#include "platform/threads.hpp"
#include "platform/uffd.hpp"

namespace uhmm::mm {

LocalZapReaders::LocalZapReaders(int uffd_fd, Hooks hooks)
    : uffd_fd_(uffd_fd), hooks_(std::move(hooks)), stop_fd_(::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK)) {}

LocalZapReaders::~LocalZapReaders() {
  stop();
  if (stop_fd_ >= 0) ::close(stop_fd_);
}

bool LocalZapReaders::before_zap() {
  const int cpu = ::sched_getcpu();
  if (cpu < 0) return false;
  // The wake-up is written under the lock, so that stop() cannot close the
  // descriptor in between.
  MutexLock lock(mutex_);
  const Reader* reader = reader_for(static_cast<unsigned>(cpu));
  if (reader == nullptr) return false;
  const std::uint64_t one = 1;
  return ::write(reader->wake_fd, &one, sizeof one) == sizeof one;
}

const LocalZapReaders::Reader* LocalZapReaders::reader_for(unsigned cpu) {
  if (stopping_ || stop_fd_ < 0) return nullptr;
  if (cpu >= readers_.size()) readers_.resize(cpu + 1);
  std::unique_ptr<Reader>& slot = readers_[cpu];
  if (slot) return slot.get();
  auto reader = std::make_unique<Reader>();
  reader->cpu = cpu;
  reader->wake_fd = ::eventfd(0, EFD_CLOEXEC | EFD_NONBLOCK);
  if (reader->wake_fd < 0) return nullptr;
  try {
    reader->thread = std::thread([this, r = reader.get()] { run(*r); });
  } catch (const std::system_error&) {
    ::close(reader->wake_fd);
    return nullptr;  // no thread to spare: the zap is read the old way
  }
  slot = std::move(reader);
  return slot.get();
}

void LocalZapReaders::run(const Reader& reader) const {
  platform::name_this_thread("zap", reader.cpu);
  (void)platform::pin_this_thread(reader.cpu);
  for (;;) {
    // Asleep until a zap on this CPU is about to start.
    struct pollfd wait[2] = {{reader.wake_fd, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
    if (::poll(wait, 2, -1) < 0) {
      if (errno == EINTR) continue;
      std::fprintf(stderr, "uhmm: zap reader cannot wait: %s\n", platform::errno_text(errno).c_str());
      return;  // zaps are read the old way
    }
    if (wait[1].revents != 0) return;
    std::uint64_t ignored;
    (void)!::read(reader.wake_fd, &ignored, sizeof ignored);
    // Read until no zap waits for its event.  Each wait ends when the
    // kernel queues a message, which is the zap's event the moment the
    // zapping thread blocks in MADV_DONTNEED (or a fault, which drain
    // passes on to the service threads); the timeout only bounds a round
    // whose zap has not started yet.  After 100 rounds (100 ms at most)
    // the fallback reader takes over.
    bool read_all = false;
    for (int round = 0; round < 100; ++round) {
      hooks_.drain();
      read_all = !hooks_.zap_unread();
      if (read_all) break;
      struct pollfd both[2] = {{uffd_fd_, POLLIN, 0}, {stop_fd_, POLLIN, 0}};
      (void)::poll(both, 2, 1);
      if (both[1].revents != 0) return;
    }
    if (!read_all) hooks_.gave_up();
  }
}

void LocalZapReaders::stop() {
  std::vector<std::unique_ptr<Reader>> readers;
  {
    MutexLock lock(mutex_);
    stopping_ = true;
    readers.swap(readers_);
  }
  if (stop_fd_ >= 0) {
    const std::uint64_t one = 1;
    (void)!::write(stop_fd_, &one, sizeof one);
  }
  for (auto& r : readers) {
    if (!r) continue;
    if (r->thread.joinable()) r->thread.join();
    ::close(r->wake_fd);
  }
}

void LocalZapReaders::abandon() {
  MutexLock lock(mutex_);
  stopping_ = true;
  for (auto& r : readers_) {
    if (!r) continue;
    if (r->thread.joinable()) r->thread.detach();
    ::close(r->wake_fd);
  }
  readers_.clear();
}

}  // namespace uhmm::mm
