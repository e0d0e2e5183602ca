// The registry of hmmkit's own thread stacks (internal_memory.hpp).
#include "hmmkit/base/internal_memory.hpp"

#include <pthread.h>

#include <algorithm>
#include <mutex>
#include <set>

namespace hmmkit {

namespace {

std::mutex& RegistryMutex() {
  static std::mutex mu;
  return mu;
}

std::multiset<std::pair<uintptr_t, uintptr_t>>& Registry() {
  static auto* ranges = new std::multiset<std::pair<uintptr_t, uintptr_t>>();  // never destroyed:
  return *ranges;  // threads may unregister during static destruction
}

}  // namespace

void InternalMemory::Add(uintptr_t start, uintptr_t end) {
  if (start >= end) return;
  std::lock_guard lock(RegistryMutex());
  Registry().emplace(start, end);
}

void InternalMemory::Remove(uintptr_t start, uintptr_t end) {
  std::lock_guard lock(RegistryMutex());
  auto it = Registry().find({start, end});
  if (it != Registry().end()) Registry().erase(it);
}

bool InternalMemory::Contains(uintptr_t va) {
  std::lock_guard lock(RegistryMutex());
  for (const auto& [s, e] : Registry())  // a few dozen threads at most
    if (s <= va && va < e) return true;
  return false;
}

std::vector<std::pair<uintptr_t, uintptr_t>> InternalMemory::Outside(
    uintptr_t start, uintptr_t end, std::pair<uintptr_t, uintptr_t> also) {
  std::vector<std::pair<uintptr_t, uintptr_t>> holes;
  {
    std::lock_guard lock(RegistryMutex());
    for (const auto& r : Registry())
      if (r.first < end && r.second > start) holes.push_back(r);
  }
  if (also.first < end && also.second > start) holes.push_back(also);
  std::sort(holes.begin(), holes.end());
  std::vector<std::pair<uintptr_t, uintptr_t>> out;
  uintptr_t cursor = start;
  for (const auto& [s, e] : holes) {
    if (s > cursor) out.emplace_back(cursor, std::min(s, end));
    cursor = std::max(cursor, e);
    if (cursor >= end) break;
  }
  if (cursor < end) out.emplace_back(cursor, end);
  return out;
}

std::pair<uintptr_t, uintptr_t> CurrentThreadStack() {
  thread_local std::pair<uintptr_t, uintptr_t> cached{0, 0};
  thread_local bool known = false;
  if (!known) {
    known = true;
    pthread_attr_t attr;
    if (pthread_getattr_np(pthread_self(), &attr) == 0) {
      void* addr = nullptr;
      size_t size = 0;
      if (pthread_attr_getstack(&attr, &addr, &size) == 0 && addr)
        cached = {reinterpret_cast<uintptr_t>(addr), reinterpret_cast<uintptr_t>(addr) + size};
      pthread_attr_destroy(&attr);
    }
  }
  return cached;
}

InternalThreadScope::InternalThreadScope() : stack_(CurrentThreadStack()) {
  InternalMemory::Add(stack_.first, stack_.second);
}

InternalThreadScope::~InternalThreadScope() {
  InternalMemory::Remove(stack_.first, stack_.second);
}

}  // namespace hmmkit
