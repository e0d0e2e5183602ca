// VulkanDmaEngine: creation, Submit, the completion thread and the destructor. The steps of
// preparing one batch are in vulkan_batch.cpp, the device state in vulkan_device.cpp and
// vulkan_memory.cpp, the loader in vulkan_loader.cpp.
#include "hmmkit/dma/vulkan_engine.hpp"

#include <fmt/format.h>

#include <cerrno>
#include <cstdint>
#include <system_error>
#include <utility>

#include "hmmkit/base/internal_memory.hpp"
#include "hmmkit/base/log.hpp"
#include "vulkan_batch.hpp"
#include "vulkan_device.hpp"

namespace hmmkit::dma {

using vulkan_detail::Batch;
using vulkan_detail::BoundBuffer;
using vulkan_detail::CommandContext;
using vulkan_detail::Core;
using vulkan_detail::DeviceMemoryRecord;

namespace {

constexpr size_t kMinImportBytes = size_t{1} << 20;

// One vkQueueSubmit of `cmd` (none when null) that signals `value` on the timeline `semaphore`.
// The caller holds the queue's lock.
VkResult SubmitSignal(const vk::DeviceFns& fn, VkQueue queue, VkCommandBuffer cmd,
                      VkSemaphore semaphore, uint64_t value) {
  auto timeline =
      vk::Make<VkTimelineSemaphoreSubmitInfo>(VK_STRUCTURE_TYPE_TIMELINE_SEMAPHORE_SUBMIT_INFO);
  timeline.signalSemaphoreValueCount = 1;
  timeline.pSignalSemaphoreValues = &value;
  auto submit = vk::Make<VkSubmitInfo>(VK_STRUCTURE_TYPE_SUBMIT_INFO, &timeline);
  submit.commandBufferCount = cmd ? 1 : 0;
  submit.pCommandBuffers = cmd ? &cmd : nullptr;
  submit.signalSemaphoreCount = 1;
  submit.pSignalSemaphores = &semaphore;
  return fn.QueueSubmit(queue, 1, &submit, VK_NULL_HANDLE);
}

// Blocks in vkWaitSemaphores until the timeline reaches `value` (no timeout: the driver wakes us).
VkResult WaitValue(const vk::DeviceFns& fn, VkDevice device, VkSemaphore semaphore,
                   uint64_t value) {
  auto wait = vk::Make<VkSemaphoreWaitInfo>(VK_STRUCTURE_TYPE_SEMAPHORE_WAIT_INFO);
  wait.semaphoreCount = 1;
  wait.pSemaphores = &semaphore;
  wait.pValues = &value;
  VkResult r;
  do {
    r = fn.WaitSemaphores(device, &wait, UINT64_MAX);
  } while (r == VK_TIMEOUT);
  return r;
}

}  // namespace

// The engine's own Vulkan objects. Set by Init, destroyed by the destructor; read-only between.
struct VulkanDmaEngine::Objects {
  VkSemaphore timeline = VK_NULL_HANDLE;
  std::shared_ptr<DeviceMemoryRecord> pattern;  // kPatternBytes, not in the allocation table
  size_t piece_bytes = 0;
};

Result<std::unique_ptr<VulkanDmaEngine>> VulkanDmaEngine::Create(const Options& options) {
  if (options.max_import_bytes < kMinImportBytes) {
    return Status::FromErrno(EINVAL, fmt::format("VulkanDmaEngine: max_import_bytes must be at "
                                                 "least {:#x}, not {:#x}",
                                                 kMinImportBytes, options.max_import_bytes));
  }
  std::unique_ptr<VulkanDmaEngine> engine(new VulkanDmaEngine(options));
  HMMKIT_RETURN_IF_ERROR(engine->Init());  // on error the destructor undoes what Init did
  return engine;
}

VulkanDmaEngine::VulkanDmaEngine(const Options& options)
    : options_(options),
      vm_(options.vm ? *options.vm : VmAccess::Real()),
      vk_(std::make_unique<Objects>()) {}

Status VulkanDmaEngine::Init() {
  Result<std::shared_ptr<Core>> core = Core::Create(options_);
  if (!core.ok()) return core.status();
  core_ = std::move(core).value();
  const vk::DeviceFns& fn = core_->fn();
  VkDevice device = core_->device();

  auto type = vk::Make<VkSemaphoreTypeCreateInfo>(VK_STRUCTURE_TYPE_SEMAPHORE_TYPE_CREATE_INFO);
  type.semaphoreType = VK_SEMAPHORE_TYPE_TIMELINE;
  type.initialValue = 0;
  auto create = vk::Make<VkSemaphoreCreateInfo>(VK_STRUCTURE_TYPE_SEMAPHORE_CREATE_INFO, &type);
  VkResult r = fn.CreateSemaphore(device, &create, nullptr, &vk_->timeline);
  if (r != VK_SUCCESS) {
    vk_->timeline = VK_NULL_HANDLE;
    return vk::Failed("VulkanDmaEngine: vkCreateSemaphore (timeline)", r);
  }
  const size_t align = core_->info().import_alignment, max = core_->info().max_import_bytes;
  vk_->piece_bytes = max > 2 * align ? max - 2 * align : align;

  // The fill pattern: kPatternSlot bytes of every byte value, written once by the device.
  Result<std::shared_ptr<DeviceMemoryRecord>> pattern = core_->AllocateDeviceMemory(
      vulkan_detail::kPatternBytes, DeviceMemoryPlacement::kMappedIfPossible, false);
  if (!pattern.ok()) return pattern.status();
  vk_->pattern = std::move(pattern).value();
  Result<std::unique_ptr<CommandContext>> context = GetContext();
  if (!context.ok()) return context.status();
  std::unique_ptr<CommandContext> ctx = std::move(context).value();
  auto begin = vk::Make<VkCommandBufferBeginInfo>(VK_STRUCTURE_TYPE_COMMAND_BUFFER_BEGIN_INFO);
  begin.flags = VK_COMMAND_BUFFER_USAGE_ONE_TIME_SUBMIT_BIT;
  r = fn.BeginCommandBuffer(ctx->cmd, &begin);
  if (r == VK_SUCCESS) {
    for (uint32_t b = 0; b < 256; ++b) {
      fn.CmdFillBuffer(ctx->cmd, vk_->pattern->bound.buffer, b * vulkan_detail::kPatternSlot,
                       vulkan_detail::kPatternSlot, b * 0x01010101u);
    }
    r = fn.EndCommandBuffer(ctx->cmd);
  }
  if (r == VK_SUCCESS) {
    uint64_t value;
    {
      MutexLock lock(queue_mu_);
      value = last_value_ + 1;
      r = SubmitSignal(fn, core_->queue(), ctx->cmd, vk_->timeline, value);
      if (r == VK_SUCCESS) last_value_ = value;
    }
    if (r == VK_SUCCESS) r = WaitValue(fn, device, vk_->timeline, value);
  }
  PutContext(std::move(ctx));
  if (r != VK_SUCCESS) return vk::Failed("VulkanDmaEngine: writing the fill pattern", r);

  try {
    completion_ = std::thread([this] {
      // A migration never takes this thread's stack.
      InternalThreadScope internal("hmmkit-vk-done");
      CompletionLoop();
    });
  } catch (const std::system_error& e) {
    return Status::FromErrno(
        e.code().value(),
        fmt::format("VulkanDmaEngine: cannot start the completion thread: {}", e.what()));
  }
  return Status::Ok();
}

VulkanDmaEngine::~VulkanDmaEngine() {
  {
    MutexLock lock(queue_mu_);
    stopping_ = true;
  }
  pending_cv_.NotifyAll();
  // The completion thread completes every pending batch before it exits.
  if (completion_.joinable()) completion_.join();
  if (!core_) return;
  const vk::DeviceFns& fn = core_->fn();
  {
    // Nothing is pending any more; this only covers a failed Init.
    MutexLock lock(queue_mu_);
    fn.QueueWaitIdle(core_->queue());
  }
  {
    MutexLock lock(pool_mu_);
    for (const auto& c : idle_contexts_) fn.DestroyCommandPool(core_->device(), c->pool, nullptr);
    idle_contexts_.clear();
  }
  if (vk_->timeline) fn.DestroySemaphore(core_->device(), vk_->timeline, nullptr);
  vk_->pattern.reset();
  // core_ goes with the engine; the device itself lives on while a DeviceAllocation holds it.
}

Result<Fence> VulkanDmaEngine::Submit(std::span<const Descriptor> descs) {
  HMMKIT_RETURN_IF_ERROR(ValidateBatch(descs));
  if (descs.empty()) return Fence();
  auto batch = std::make_shared<Batch>(descs.size());
  HMMKIT_RETURN_IF_ERROR(vulkan_detail::ResolveEndpoints(*core_, descs, *batch));
  Fence fence = batch->signal.fence();
  uint64_t bytes = 0;
  for (const Descriptor& d : descs) bytes += d.len;
  {
    MutexLock lock(stats_mu_);
    stats_.batches++;
    stats_.descriptors += descs.size();
    stats_.bytes += bytes;
  }

  const vulkan_detail::PrepareContext ctx{*core_, vm_, options_.populate_probe, vk_->piece_bytes,
                                          vk_->pattern->bound.buffer};
  const std::vector<vulkan_detail::Piece> pieces =
      vulkan_detail::ProbeAndImport(ctx, descs, *batch);
  if (!batch->imports.empty()) {
    uint64_t imported = 0;
    for (const BoundBuffer& b : batch->imports) imported += b.size;
    MutexLock lock(stats_mu_);
    vulkan_stats_.imports += batch->imports.size();
    vulkan_stats_.imported_bytes += imported;
  }
  Status error;
  if (!pieces.empty()) {
    Result<std::unique_ptr<CommandContext>> context = GetContext();
    if (context.ok()) {
      batch->context = std::move(context).value();
      error = vulkan_detail::Record(ctx, descs, pieces, *batch);
    } else {
      error = context.status();
    }
  }
  // A batch whose descriptors all failed at Submit is still queued (with no command buffer), so
  // that its fence completes on the completion thread like any other.
  if (error.ok()) error = Queue(batch);
  if (!error.ok()) {
    // Nothing of this batch reached the device: complete it here, on the submitting thread.
    Complete(*batch, Status::FromErrno(error.errno_value(),
                                       fmt::format("batch not run: {}", error.message())));
  }
  return fence;
}

Status VulkanDmaEngine::Queue(const std::shared_ptr<Batch>& batch) {
  {
    MutexLock lock(queue_mu_);
    if (device_lost_) return Status::FromErrno(EIO, "the Vulkan device was lost earlier");
    const uint64_t value = last_value_ + 1;
    const VkResult r =
        SubmitSignal(core_->fn(), core_->queue(),
                     batch->context ? batch->context->cmd : VK_NULL_HANDLE, vk_->timeline, value);
    if (r != VK_SUCCESS) {
      if (r == VK_ERROR_DEVICE_LOST) device_lost_ = true;
      return Status::FromErrno(EIO, fmt::format("vkQueueSubmit: {}", vk::ResultName(r)));
    }
    last_value_ = value;
    batch->value = value;
    pending_.push_back(batch);
  }
  pending_cv_.NotifyOne();
  MutexLock lock(stats_mu_);
  vulkan_stats_.submissions++;
  return Status::Ok();
}

void VulkanDmaEngine::CompletionLoop() {
  const vk::DeviceFns& fn = core_->fn();
  std::vector<std::shared_ptr<Batch>> done;
  for (;;) {
    uint64_t target;
    {
      MutexLock lock(queue_mu_);
      pending_cv_.Wait(queue_mu_,
                       [&]() REQUIRES(queue_mu_) { return stopping_ || !pending_.empty(); });
      if (pending_.empty()) return;  // stopping, and every batch has completed
      target = pending_.front()->value;
    }
    // No lock held while the driver blocks us.
    uint64_t reached = 0;
    VkResult r = WaitValue(fn, core_->device(), vk_->timeline, target);
    if (r == VK_SUCCESS) r = fn.GetSemaphoreCounterValue(core_->device(), vk_->timeline, &reached);
    Status error;
    if (r != VK_SUCCESS) {
      // The device is lost (or the wait broke): nothing pending will ever signal. Fail it all.
      error = Status::FromErrno(
          EIO, fmt::format("waiting for the Vulkan device failed ({}); the batch may have run in "
                           "part",
                           vk::ResultName(r)));
      Log().error("VulkanDmaEngine: {}", error.message());
    }
    {
      MutexLock lock(queue_mu_);
      if (!error.ok()) device_lost_ = true;
      while (!pending_.empty() && (!error.ok() || pending_.front()->value <= reached)) {
        done.push_back(std::move(pending_.front()));
        pending_.pop_front();
      }
    }
    for (const std::shared_ptr<Batch>& b : done) Complete(*b, error);
    done.clear();
  }
}

void VulkanDmaEngine::Complete(Batch& batch, const Status& error) {
  // The device is done with the batch: release its memory first, so that a waiter that wakes may
  // unmap it at once.
  for (BoundBuffer& b : batch.imports) core_->DestroyBuffer(b);
  batch.imports.clear();
  batch.device.clear();
  if (batch.context) PutContext(std::move(batch.context));
  uint64_t failed = 0;
  for (size_t i = 0; i < batch.results.size(); ++i) {
    if (!batch.results[i].ok()) {
      failed++;
      if (Log().should_log(spdlog::level::debug)) {
        Log().debug("dma {}: {}", name(), batch.results[i].ToString());
      }
    } else if (!error.ok()) {
      failed++;
    }
  }
  if (failed) {
    MutexLock lock(stats_mu_);
    vulkan_stats_.failed_descriptors += failed;
  }
  // The fence completes with the last Finish: waiters wake, handlers are posted. No lock held.
  for (size_t i = 0; i < batch.results.size(); ++i) {
    // Not a conditional expression: its result would be a const copy, and no move would happen.
    if (batch.results[i].ok()) {
      batch.signal.Finish(i, error);
    } else {
      batch.signal.Finish(i, std::move(batch.results[i]));
    }
  }
}

Result<std::unique_ptr<CommandContext>> VulkanDmaEngine::GetContext() {
  {
    MutexLock lock(pool_mu_);
    if (!idle_contexts_.empty()) {
      std::unique_ptr<CommandContext> c = std::move(idle_contexts_.back());
      idle_contexts_.pop_back();
      return c;
    }
  }
  const vk::DeviceFns& fn = core_->fn();
  auto c = std::make_unique<CommandContext>();
  auto pool = vk::Make<VkCommandPoolCreateInfo>(VK_STRUCTURE_TYPE_COMMAND_POOL_CREATE_INFO);
  pool.flags = VK_COMMAND_POOL_CREATE_TRANSIENT_BIT;
  pool.queueFamilyIndex = core_->info().queue_family;
  VkResult r = fn.CreateCommandPool(core_->device(), &pool, nullptr, &c->pool);
  if (r != VK_SUCCESS) return vk::Failed("vkCreateCommandPool", r);
  auto alloc =
      vk::Make<VkCommandBufferAllocateInfo>(VK_STRUCTURE_TYPE_COMMAND_BUFFER_ALLOCATE_INFO);
  alloc.commandPool = c->pool;
  alloc.level = VK_COMMAND_BUFFER_LEVEL_PRIMARY;
  alloc.commandBufferCount = 1;
  r = fn.AllocateCommandBuffers(core_->device(), &alloc, &c->cmd);
  if (r != VK_SUCCESS) {
    fn.DestroyCommandPool(core_->device(), c->pool, nullptr);
    return vk::Failed("vkAllocateCommandBuffers", r);
  }
  return c;
}

void VulkanDmaEngine::PutContext(std::unique_ptr<CommandContext> context) {
  // Only this context's owner touches its pool: resetting needs no lock.
  core_->fn().ResetCommandPool(core_->device(), context->pool, 0);
  MutexLock lock(pool_mu_);
  idle_contexts_.push_back(std::move(context));
}

DmaEngine::Stats VulkanDmaEngine::stats() const {
  MutexLock lock(stats_mu_);
  return stats_;
}

VulkanDmaEngine::VulkanStats VulkanDmaEngine::vulkan_stats() const {
  MutexLock lock(stats_mu_);
  return vulkan_stats_;
}

Result<DeviceAllocation> VulkanDmaEngine::AllocateDeviceMemory(size_t len,
                                                               DeviceMemoryPlacement placement) {
  Result<std::shared_ptr<DeviceMemoryRecord>> record =
      core_->AllocateDeviceMemory(len, placement, true);
  if (!record.ok()) return record.status();
  return DeviceAllocation(std::move(record).value());
}

const VulkanDmaEngine::DeviceInfo& VulkanDmaEngine::device_info() const {
  return core_->info();
}

std::optional<VulkanDmaEngine::DrmNode> VulkanDmaEngine::drm_node() const {
  const DeviceInfo& info = core_->info();
  return info.drm_render ? info.drm_render : info.drm_primary;
}

}  // namespace hmmkit::dma
