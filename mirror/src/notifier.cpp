// The interval-notifier tree and its sequence protocol (see notifier.hpp for the driver's side).
//
// Parts:
//   - An intrusive augmented treap of IntervalNotifier nodes, keyed by (start_, id_). The key is
//     unique because id_ is; equal starts keep insertion order. Every node caches max_end_, the
//     largest end_ in its subtree, so a search prunes any subtree that ends at or before the range.
//     Priorities come from a xorshift generator, so the expected depth is O(log n) whatever the
//     insertion order (100,000 subscriptions are a few dozen levels deep).
//   - The sequence (seq_, active_): even while idle, odd while at least one invalidation runs. All
//     concurrent invalidations share one odd value, and the sequence only turns even again when the
//     last of them ends; ReadBegin of a subscription that was called with that odd value waits.
//   - The walk (CallOverlapping): one overlapping subscription at a time. Under mu_ it finds the
//     first overlapping node whose key is greater than the last key visited, records the call in
//     calling_ and drops mu_; the callback runs unlocked. The walk keeps the last key by value and
//     never touches a node after its callback returned: the callback may have removed and destroyed
//     it. Because no node pointer survives across a callback, Insert and Remove link and unlink at
//     once, also while invalidations run (the kernel needs a deferred list; we do not).
//
// Locking: mu_ protects the treap links, count_, the sequence, next_id_, rng_ and calling_. It is a
// leaf lock held only for O(log n) work, never across a callback, so callbacks may take any driver
// lock and may call Insert/Remove. Waits (ReadBegin, Remove) sleep on cv_, which is signalled when
// an invalidation ends and whenever a callback returns.
//
// Misuse that is not supported: removing two subscriptions from inside each other's callbacks on
// two threads at once deadlocks (each Remove waits for the other callback), as it would in the
// kernel. Callbacks must not throw: a throwing callback terminates the process, because the tree
// could otherwise stay "invalidating" forever.
#include "hmmkit/mirror/notifier.hpp"

#include <algorithm>
#include <cerrno>
#include <cstdlib>
#include <limits>

#include "hmmkit/base/log.hpp"
#include "hmmkit/base/trace.hpp"

namespace hmmkit {

namespace {

// A treap key: the node's start, then its id. {0, 0} precedes every real key (ids start at 1).
struct Key {
  uintptr_t start = 0;
  uint64_t id = 0;
};

bool KeyLess(const Key& a, const Key& b) {
  return a.start < b.start || (a.start == b.start && a.id < b.id);
}

// Calls the driver. noexcept: see the file comment.
void CallInvalidate(IntervalNotifierOps& ops, IntervalNotifier& sub, const NotifierRange& range,
                    uint64_t cur_seq) noexcept {
  ops.Invalidate(sub, range, cur_seq);
}

}  // namespace

// The treap algorithms. Static functions on nodes; every caller holds the owning tree's mu_ (the
// links are not annotated, so the compiler cannot check this: only NotifierTree calls them).
// Recursion depth is the treap's depth, O(log n) expected.
struct NotifierNodeAccess {
  using Node = IntervalNotifier;

  static Key KeyOf(const Node* n) { return Key{n->start_, n->id_}; }

  // Recomputes n->max_end_ from n and its children.
  static void Update(Node* n) {
    uintptr_t m = n->end_;
    if (n->left_ != nullptr) m = std::max(m, n->left_->max_end_);
    if (n->right_ != nullptr) m = std::max(m, n->right_->max_end_);
    n->max_end_ = m;
  }

  // Joins two treaps where every key of a is less than every key of b.
  static Node* Merge(Node* a, Node* b) {
    if (a == nullptr) return b;
    if (b == nullptr) return a;
    if (a->priority_ > b->priority_) {
      a->right_ = Merge(a->right_, b);
      Update(a);
      return a;
    }
    b->left_ = Merge(a, b->left_);
    Update(b);
    return b;
  }

  // Splits t into *lo (keys < k) and *hi (keys >= k).
  static void Split(Node* t, const Key& k, Node** lo, Node** hi) {
    if (t == nullptr) {
      *lo = nullptr;
      *hi = nullptr;
      return;
    }
    if (KeyLess(KeyOf(t), k)) {
      Split(t->right_, k, &t->right_, hi);
      *lo = t;
    } else {
      Split(t->left_, k, lo, &t->left_);
      *hi = t;
    }
    Update(t);
  }

  // Links n (children cleared, key and priority set) into t; returns the new root.
  static Node* Insert(Node* t, Node* n) {
    if (t == nullptr) {
      Update(n);
      return n;
    }
    if (n->priority_ > t->priority_) {
      Split(t, KeyOf(n), &n->left_, &n->right_);
      Update(n);
      return n;
    }
    if (KeyLess(KeyOf(n), KeyOf(t))) {
      t->left_ = Insert(t->left_, n);
    } else {
      t->right_ = Insert(t->right_, n);
    }
    Update(t);
    return t;
  }

  // Unlinks n, which must be in t; returns the new root.
  static Node* Erase(Node* t, Node* n) {
    if (t == nullptr) {
      // n claimed to be linked but is not in this treap: the tree is corrupt.
      Log().critical("NotifierTree: linked subscription {} missing from its tree",
                     static_cast<const void*>(n));
      std::abort();
    }
    if (t == n) {
      Node* joined = Merge(n->left_, n->right_);
      n->left_ = nullptr;
      n->right_ = nullptr;
      return joined;
    }
    if (KeyLess(KeyOf(n), KeyOf(t))) {
      t->left_ = Erase(t->left_, n);
    } else {
      t->right_ = Erase(t->right_, n);
    }
    Update(t);
    return t;
  }

  // The node with the smallest key greater than `after` that overlaps [qs, qe), or nullptr.
  // O(log n) expected: a subtree is entered only when its max_end_ reaches past qs, and nothing
  // right of a node that starts at or after qe is looked at.
  static Node* FindNext(Node* t, uintptr_t qs, uintptr_t qe, const Key& after) {
    while (t != nullptr && t->max_end_ > qs) {
      if (!KeyLess(after, KeyOf(t))) {
        // t and its left subtree are at or before `after`.
        t = t->right_;
        continue;
      }
      if (Node* found = FindNext(t->left_, qs, qe, after)) return found;
      if (t->start_ >= qe) return nullptr;  // t and everything right of it start too late
      if (t->end_ > qs) return t;
      t = t->right_;
    }
    return nullptr;
  }

  // Unlinks every node of t without calling anything; O(n), no recursion, no allocation
  // (rotates left children up until the root has none, then peels the root).
  static void DetachAll(Node* t) {
    while (t != nullptr) {
      if (Node* l = t->left_; l != nullptr) {
        t->left_ = l->right_;
        l->right_ = t;
        t = l;
        continue;
      }
      Node* next = t->right_;
      t->right_ = nullptr;
      t->linked_ = false;
      t->tree_ = nullptr;
      t = next;
    }
  }
};

using Access = NotifierNodeAccess;

const char* ToString(InvalidateEvent event) {
  switch (event) {
    case InvalidateEvent::kUnmap:
      return "unmap";
    case InvalidateEvent::kClear:
      return "clear";
    case InvalidateEvent::kProtectionVma:
      return "protection_vma";
    case InvalidateEvent::kProtectionPage:
      return "protection_page";
    case InvalidateEvent::kMigrate:
      return "migrate";
    case InvalidateEvent::kExclusive:
      return "exclusive";
    case InvalidateEvent::kRelease:
      return "release";
  }
  return "unknown";
}

// ---- IntervalNotifier ---------------------------------------------------------------------------

IntervalNotifier::~IntervalNotifier() {
  if (tree_ != nullptr) tree_->Remove(*this);
}

bool IntervalNotifier::inserted() const {
  return tree_ != nullptr;
}

uint64_t IntervalNotifier::ReadBegin() {
  NotifierTree* tree = tree_;
  // Not inserted: nothing can invalidate it, so there is nothing to wait for.
  if (tree == nullptr) return invalidate_seq_.load(std::memory_order_acquire);
  return tree->ReadBegin(*this);
}

// ---- NotifierTree -------------------------------------------------------------------------------

NotifierTree::~NotifierTree() {
  // Subscriptions still inserted are detached, not called: their owners may already be tearing
  // down. Their destructors then see tree_ == nullptr and do nothing.
  MutexLock lock(mu_);
  Access::DetachAll(root_);
  root_ = nullptr;
  count_ = 0;
}

Status NotifierTree::Insert(IntervalNotifier& sub, uintptr_t start, size_t length,
                            IntervalNotifierOps& ops) {
  if (length == 0) return Status::FromErrno(EINVAL, "NotifierTree::Insert: empty range");
  if (length > std::numeric_limits<uintptr_t>::max() - start) {
    return Status::FromErrno(EINVAL, "NotifierTree::Insert: range overflows the address space");
  }
  if (sub.tree_ != nullptr) {
    return Status::FromErrno(EINVAL, "NotifierTree::Insert: subscription already inserted");
  }

  MutexLock lock(mu_);
  sub.tree_ = this;
  sub.ops_ = &ops;
  sub.start_ = start;
  sub.end_ = start + length;
  sub.id_ = next_id_++;
  // xorshift32; the state never becomes 0 from a non-zero seed.
  rng_ ^= rng_ << 13;
  rng_ ^= rng_ >> 17;
  rng_ ^= rng_ << 5;
  sub.priority_ = rng_;
  sub.left_ = nullptr;
  sub.right_ = nullptr;
  // While an invalidation runs, the new subscription may already mirror pages that are changing:
  // give it the running (odd) sequence so that its ReadBegin waits for the end. Otherwise any value
  // other than a future cur_seq will do; seq_ - 1 is odd and already past.
  sub.invalidate_seq_.store(active_ != 0 ? seq_ : seq_ - 1, std::memory_order_release);
  root_ = Access::Insert(root_, &sub);
  sub.linked_ = true;
  ++count_;
  return Status::Ok();
}

void NotifierTree::Remove(IntervalNotifier& sub) {
  if (sub.tree_ == nullptr) return;
  if (sub.tree_ != this) {
    Log().critical("NotifierTree::Remove: subscription {} belongs to another tree",
                   static_cast<const void*>(&sub));
    std::abort();
  }
  MutexLock lock(mu_);
  RemoveLocked(sub);
}

void NotifierTree::RemoveLocked(IntervalNotifier& sub) {
  if (sub.linked_) {
    root_ = Access::Erase(root_, &sub);
    sub.linked_ = false;
    --count_;
  }
  // Unlinked: no walk can find it any more. Wait for the calls already made on other threads; a
  // call on this thread is our caller (Remove from inside the callback) and must not be waited for.
  const std::thread::id me = std::this_thread::get_id();
  cv_.Wait(mu_, [&] {
    mu_.AssertHeld();
    return std::none_of(calling_.begin(), calling_.end(),
                        [&](const Calling& c) { return c.sub == &sub && c.thread != me; });
  });
  sub.tree_ = nullptr;
}

uint64_t NotifierTree::BeginLocked() {
  if (active_ == 0) ++seq_;  // idle -> invalidating (odd)
  ++active_;
  return seq_;
}

void NotifierTree::EndInvalidation() {
  {
    MutexLock lock(mu_);
    if (--active_ == 0) ++seq_;  // last one out: idle again (even)
  }
  cv_.NotifyAll();
}

namespace {

trace::InvalidateKind TraceKindOf(InvalidateEvent event) {
  switch (event) {
    case InvalidateEvent::kUnmap:
      return trace::InvalidateKind::kUnmap;
    case InvalidateEvent::kClear:
      return trace::InvalidateKind::kClear;
    case InvalidateEvent::kProtectionVma:
    case InvalidateEvent::kProtectionPage:
      return trace::InvalidateKind::kMprotect;
    case InvalidateEvent::kMigrate:
      return trace::InvalidateKind::kMigrate;
    case InvalidateEvent::kExclusive:
      return trace::InvalidateKind::kExclusive;
    case InvalidateEvent::kRelease:
      return trace::InvalidateKind::kRelease;
  }
  return trace::InvalidateKind::kClear;
}

}  // namespace

size_t NotifierTree::CallOverlapping(const NotifierRange& range, uint64_t cur_seq) {
  if (range.end <= range.start) return 0;  // an empty range overlaps nothing
  // One "invalidate" per dispatch, lasting as long as the callbacks run.
  trace::Span span(trace::Name::kInvalidate, trace::kNotifierTrack);
  span.ev.a[0] = range.start;
  span.ev.a[1] = range.end;
  span.ev.small = uint32_t(TraceKindOf(range.event));
  const std::thread::id me = std::this_thread::get_id();
  size_t called = 0;
  Key last;  // {0, 0}: before every subscription
  for (;;) {
    IntervalNotifier* sub = nullptr;
    IntervalNotifierOps* ops = nullptr;
    {
      MutexLock lock(mu_);
      sub = Access::FindNext(root_, range.start, range.end, last);
      if (sub == nullptr) break;
      last = Access::KeyOf(sub);
      ops = sub->ops_;
      calling_.push_back(Calling{sub, me});
    }
    CallInvalidate(*ops, *sub, range, cur_seq);
    ++called;
    // From here on `sub` is only an identity: the callback may have removed and freed it.
    {
      MutexLock lock(mu_);
      for (auto it = calling_.end(); it != calling_.begin();) {
        --it;
        if (it->sub == sub && it->thread == me) {
          *it = calling_.back();
          calling_.pop_back();
          break;
        }
      }
    }
    cv_.NotifyAll();
  }
  return called;
}

uint64_t NotifierTree::ReadBegin(IntervalNotifier& sub) {
  MutexLock lock(mu_);
  // The sub was called by the running invalidation(s) exactly when its sequence equals the odd
  // tree sequence; it then waits until the sequence turns even (every invalidation ended).
  // The value is loaded once and that same value is returned: a callback may SetSeq (without mu_)
  // at any moment, and returning a second, newer load could hand out the sequence of an
  // invalidation that is still running, which ReadRetry would then accept.
  uint64_t seq = 0;
  cv_.Wait(mu_, [&] {
    mu_.AssertHeld();
    seq = sub.invalidate_seq_.load(std::memory_order_acquire);
    return !((seq_ & 1) != 0 && seq == seq_);
  });
  return seq;
}

size_t NotifierTree::Invalidate(const NotifierRange& range) {
  uint64_t cur_seq = 0;
  {
    MutexLock lock(mu_);
    cur_seq = BeginLocked();
  }
  invalidations_.fetch_add(1, std::memory_order_relaxed);
  const size_t called = CallOverlapping(range, cur_seq);
  EndInvalidation();
  return called;
}

NotifierTree::Scope::Scope(NotifierTree& tree, const NotifierRange& range) : tree_(tree) {
  uint64_t cur_seq = 0;
  {
    MutexLock lock(tree_.mu_);
    cur_seq = tree_.BeginLocked();
  }
  tree_.invalidations_.fetch_add(1, std::memory_order_relaxed);
  called_ = tree_.CallOverlapping(range, cur_seq);
}

NotifierTree::Scope::~Scope() {
  tree_.EndInvalidation();
}

size_t NotifierTree::size() const {
  MutexLock lock(mu_);
  return count_;
}

uint64_t NotifierTree::seq() const {
  MutexLock lock(mu_);
  return seq_;
}

}  // namespace hmmkit
