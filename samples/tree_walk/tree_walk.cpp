// tree_walk: the CPU builds a binary search tree with `new`; the device answers lookups by walking
// it (one lookup per index) and counts the visits of every node with a device atomic; the CPU
// checks the answers against its own walk, and the visit counts against the path lengths.
#include <cstdio>
#include <cstdlib>
#include <random>
#include <vector>

#include "../print_stats.hpp"
#include "hmmkit/svm.hpp"

namespace {

struct TreeNode {
  uint64_t key;
  uint64_t payload;
  uint64_t visits;
  TreeNode* left;
  TreeNode* right;
};

TreeNode* Insert(TreeNode* root, uint64_t key) {
  TreeNode** at = &root;
  while (*at) at = key < (*at)->key ? &(*at)->left : &(*at)->right;
  *at = new TreeNode{key, key * 7 + 1, 0, nullptr, nullptr};
  return root;
}

void Free(TreeNode* n) {
  if (!n) return;
  Free(n->left);
  Free(n->right);
  delete n;
}

}  // namespace

int main(int argc, char** argv) {
  const size_t nodes = argc > 1 ? std::strtoull(argv[1], nullptr, 0) : 20000;
  const size_t queries = argc > 2 ? std::strtoull(argv[2], nullptr, 0) : 20000;
  if (nodes == 0) {  // the keys are drawn modulo 4 * nodes
    std::fprintf(stderr, "tree_walk: the tree needs at least one node\n");
    return 2;
  }
  auto dev = hmmkit::svm::Device::Open();
  if (!dev.ok()) {
    std::fprintf(stderr, "tree_walk: cannot open a device: %s\n", dev.status().ToString().c_str());
    return 2;
  }
  std::mt19937_64 rng(42);
  TreeNode* root = nullptr;
  for (size_t i = 0; i < nodes; ++i) root = Insert(root, rng() % (4 * nodes));
  std::vector<uint64_t> keys(queries), answers(queries, 0);
  for (auto& k : keys) k = rng() % (4 * nodes);

  const uint64_t* key_array = keys.data();
  uint64_t* answer_array = answers.data();
  TreeNode* const* root_cell = &root;  // a stack variable, read by the device
  hmmkit::Status st = (*dev)->Launch(queries, [&](hmmkit::svm::KernelContext& k, size_t q) {
    const uint64_t key = k.Load(&key_array[q]);
    uint64_t answer = 0;  // 0: not found (payloads are odd)
    for (TreeNode* n = k.Load(root_cell); n != nullptr;) {
      k.AtomicAdd(&n->visits, uint64_t(1));
      const uint64_t nk = k.Load(&n->key);
      if (nk == key) {
        answer = k.Load(&n->payload);
        break;
      }
      n = key < nk ? k.Load(&n->left) : k.Load(&n->right);
    }
    k.Store(&answer_array[q], answer);
  });
  if (!st.ok()) {
    std::fprintf(stderr, "tree_walk: launch failed: %s\n", st.ToString().c_str());
    return 1;
  }
  size_t wrong = 0, found = 0;
  uint64_t path_total = 0;
  for (size_t q = 0; q < queries; ++q) {
    uint64_t answer = 0;
    for (TreeNode* n = root; n != nullptr; n = keys[q] < n->key ? n->left : n->right) {
      ++path_total;
      if (n->key == keys[q]) {
        answer = n->payload;
        break;
      }
    }
    if (answer != answers[q]) ++wrong;
    if (answer) ++found;
  }
  // Every visit the device counted is a step of some lookup.
  uint64_t visits = 0;
  std::vector<TreeNode*> todo{root};
  while (!todo.empty()) {
    TreeNode* n = todo.back();
    todo.pop_back();
    if (!n) continue;
    visits += n->visits;
    todo.push_back(n->left);
    todo.push_back(n->right);
  }
  if (visits != path_total) ++wrong;
  std::printf("tree_walk: %zu lookups (%zu hits) in a %zu-node tree on %s: %s (%llu node visits)\n",
              queries, found, nodes, (*dev)->name().c_str(), wrong ? "WRONG" : "correct",
              static_cast<unsigned long long>(visits));
  PrintStats("lookups", (*dev)->stats());
  Free(root);
  return wrong ? 1 : 0;
}
