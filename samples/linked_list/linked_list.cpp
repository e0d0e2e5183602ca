// linked_list: the CPU builds lists with `new`; the device walks them by following the very
// pointers the CPU stored (no serialization, no pointer fix-up), doubles every value and adds it
// to a total with a device atomic; the CPU then checks the lists and the total.
#include <cstdio>
#include <cstdlib>
#include <memory>
#include <vector>

#include "../print_stats.hpp"
#include "hmmkit/svm.hpp"

namespace {

struct Node {
  uint64_t value;
  Node* next;
};

}  // namespace

int main(int argc, char** argv) {
  const size_t lists = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 64;
  const size_t length = argc > 2 ? std::strtoull(argv[2], nullptr, 0) : 1000;
  auto dev = hmmkit::svm::Device::Open();
  if (!dev.ok()) {
    std::fprintf(stderr, "linked_list: cannot open a device: %s\n",
                 dev.status().ToString().c_str());
    return 2;
  }
  std::vector<Node*> heads(lists, nullptr);
  uint64_t expected_total = 0;
  for (size_t l = 0; l < lists; ++l) {
    for (size_t i = 0; i < length; ++i) {
      heads[l] = new Node{l * length + i, heads[l]};
      expected_total += 2 * (l * length + i);
    }
  }
  // The total lives in its own allocation: the device updates it with atomics.
  auto* total = new uint64_t(0);
  std::vector<uint64_t> lengths(lists, 0);

  Node** head_array = heads.data();
  uint64_t* length_array = lengths.data();
  hmmkit::Status st = (*dev)->Launch(lists, [&](hmmkit::svm::KernelContext& k, size_t l) {
    uint64_t n = 0;
    for (Node* p = k.Load(&head_array[l]); p != nullptr; p = k.Load(&p->next)) {
      const uint64_t doubled = 2 * k.Load(&p->value);
      k.Store(&p->value, doubled);
      k.AtomicAdd(total, doubled);
      ++n;
    }
    k.Store(&length_array[l], n);
  });
  if (!st.ok()) {
    std::fprintf(stderr, "linked_list: launch failed: %s\n", st.ToString().c_str());
    return 1;
  }
  // Back on the CPU, through the same pointers.
  size_t wrong = 0;
  for (size_t l = 0; l < lists; ++l) {
    size_t i = length;
    for (Node* p = heads[l]; p != nullptr; p = p->next) {
      --i;
      if (p->value != 2 * (l * length + i)) ++wrong;
    }
    if (lengths[l] != length) ++wrong;
  }
  if (*total != expected_total) ++wrong;
  std::printf("linked_list: %zu lists of %zu nodes walked on %s: %s (total %llu)\n", lists, length,
              (*dev)->name().c_str(), wrong ? "WRONG" : "correct",
              static_cast<unsigned long long>(*total));
  PrintStats("walk", (*dev)->stats());
  for (Node* h : heads) {
    while (h) {
      Node* next = h->next;
      delete h;
      h = next;
    }
  }
  delete total;
  return wrong ? 1 : 0;
}
