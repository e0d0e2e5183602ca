// `hmmctl info`: the kernel-feature probe and the mechanism table, as plain text or JSON.
#include <algorithm>
#include <cinttypes>
#include <cstdio>
#include <cstdlib>
#include <string>
#include <string_view>
#include <vector>

#include "hmmctl.hpp"
#include "hmmkit/base/json.hpp"
#include "hmmkit/drm/discovery.hpp"
#include "hmmkit/mirror/kernel_features.hpp"
#include "hmmkit/mirror/uapi.hpp"

namespace hmmkit::hmmctl {
namespace {

// The names KernelFeatures::Probe honours (kernel_features.hpp); only used to word the message
// about names it does not know.
constexpr const char* kKnownDisable =
    "pagemap_scan, procmap_query, madv_populate, uffdio_move, uffd_wp, dev_userfaultfd";

std::string Hex(uint64_t v) {
  char buf[24];
  std::snprintf(buf, sizeof(buf), "0x%" PRIx64, v);
  return buf;
}

// One row of the feature table.
struct FeatureRow {
  std::string name;
  bool yes;
  std::string detail;
};

std::vector<FeatureRow> FeatureRows(const KernelFeatures& f) {
  auto detail = [&f](const char* disable_name, std::string text) {
    if (disable_name && f.disabled.count(disable_name))
      return std::string("disabled by HMMKIT_DISABLE");
    return text;
  };
  std::string uffd = ToString(f.uffd_mode);
  if (f.disabled.count("dev_userfaultfd"))
    uffd += " (/dev/userfaultfd disabled by HMMKIT_DISABLE)";
  else if (!f.uffd_error.empty())
    uffd += " (" + f.uffd_error + ")";
  std::string hugetlb = f.hugetlb_page_size == 0
                            ? std::string("not in the kernel")
                            : std::to_string(f.hugetlb_page_size / 1024) + " kB pages, " +
                                  std::to_string(f.hugetlb_total) + " total, " +
                                  std::to_string(f.hugetlb_free) + " free";
  return {
      {"userfaultfd", f.uffd_mode != UffdOpenMode::kNone, uffd},
      {"uffd write-protect, anon", f.uffd_wp, detail("uffd_wp", "UFFD_FEATURE_PAGEFAULT_FLAG_WP")},
      {"uffd write-protect, shmem", f.uffd_wp_shmem,
       detail("uffd_wp", "UFFD_FEATURE_WP_HUGETLBFS_SHMEM")},
      {"UFFDIO_MOVE", f.uffdio_move, detail("uffdio_move", "since 6.8")},
      {"UFFDIO_POISON", f.uffd_poison, "since 6.6"},
      {"PAGEMAP_SCAN", f.pagemap_scan, detail("pagemap_scan", "since 6.7")},
      {"PROCMAP_QUERY", f.procmap_query, detail("procmap_query", "since 6.11")},
      {"pagemap PFNs", f.pagemap_pfns,
       f.pagemap_pfns ? "zero page PFN " + Hex(f.zero_pfn) : std::string("needs CAP_SYS_ADMIN")},
      {"/proc/kpageflags", f.kpageflags, f.kpageflags ? "" : "needs root"},
      {"MADV_POPULATE_READ/WRITE", f.madv_populate, detail("madv_populate", "since 5.14")},
      {"MADV_COLLAPSE", f.madv_collapse, "since 6.1"},
      {"THP", f.thp == ThpMode::kAlways || f.thp == ThpMode::kMadvise,
       std::string("enabled=") + ToString(f.thp) +
           (f.thp_shmem.empty() ? "" : ", shmem=" + f.thp_shmem)},
      {"hugetlb", f.hugetlb_total > 0, hugetlb},
  };
}

// ---- text -------------------------------------------------------------------------------------

std::string Pad(std::string s, size_t width) {
  if (s.size() < width) s.append(width - s.size(), ' ');
  return s;
}

// Prints one table line without trailing blanks.
void Line(std::string s) {
  while (!s.empty() && s.back() == ' ') s.pop_back();
  std::printf("%s\n", s.c_str());
}

void PrintText(const KernelFeatures& f) {
  Line("hmmkit on Linux " + f.kernel_release + ", page size " + std::to_string(f.page_size));

  Line("\nKernel features");
  for (const FeatureRow& r : FeatureRows(f)) {
    Line("  " + Pad(r.name, 26) + " " + Pad(r.yes ? "yes" : "no", 3) + "  " + r.detail);
  }

  Line("\nuserfaultfd features (UFFD_FEATURE_*, from the UFFDIO_API handshake)");
  if (f.uffd_mode == UffdOpenMode::kNone) {
    Line("  none: no userfaultfd");
  } else {
    uint64_t known = 0;
    for (const auto& [name, bit] : UffdFeatureNames()) {
      known |= bit;
      Line("  " + Pad(name, 26) + " " + (f.has_uffd_feature(bit) ? "yes" : "no"));
    }
    for (int b = 0; b < 64; ++b) {
      uint64_t bit = uint64_t(1) << b;
      if ((f.uffd_features & bit) && !(known & bit)) {
        Line("  " + Pad("bit " + std::to_string(b), 26) + " yes (unknown to hmmkit)");
      }
    }
    std::string ioctls;
    for (auto [name, nr] :
         {std::pair{"REGISTER", _UFFDIO_REGISTER}, std::pair{"UNREGISTER", _UFFDIO_UNREGISTER},
          std::pair{"API", _UFFDIO_API}}) {
      if (f.uffd_ioctls & (uint64_t(1) << nr))
        ioctls += std::string(ioctls.empty() ? "" : ", ") + name;
    }
    Line("  raw features " + Hex(f.uffd_features) + "; ioctls " + Hex(f.uffd_ioctls) + " (" +
         ioctls + ")");
  }

  Line("\nMechanisms");
  const auto rows = ChooseMechanisms(f);
  size_t fw = 7, mw = 9;
  for (const MechanismChoice& m : rows) {
    fw = std::max(fw, m.feature.size());
    mw = std::max(mw, m.mechanism.size());
  }
  Line("  " + Pad("feature", fw) + "  " + Pad("mechanism", mw) + "  " + Pad("status", 8) +
       "  note");
  for (const MechanismChoice& m : rows) {
    Line("  " + Pad(m.feature, fw) + "  " + Pad(m.mechanism, mw) + "  " +
         Pad(m.degraded ? "degraded" : "ok", 8) + "  " + m.note);
  }

  std::string disabled;
  for (const std::string& name : f.disabled) disabled += (disabled.empty() ? "" : ", ") + name;
  Line("\nDisabled by HMMKIT_DISABLE: " + (disabled.empty() ? std::string("none") : disabled));
  for (const std::string& name : f.disabled_unknown) {
    Line("HMMKIT_DISABLE: unknown name '" + name + "' ignored (known: " + kKnownDisable + ")");
  }
}

// ---- JSON -------------------------------------------------------------------------------------

// Writes `"key": value` pairs with commas and indentation; values are already JSON.
class JsonObject {
 public:
  explicit JsonObject(int indent) : indent_(indent) {}
  JsonObject& Raw(std::string_view key, const std::string& json) {
    body_ += first_ ? "\n" : ",\n";
    first_ = false;
    body_ += std::string(size_t(indent_) + 2, ' ') + JsonString(key) + ": " + json;
    return *this;
  }
  JsonObject& Str(std::string_view key, std::string_view v) { return Raw(key, JsonString(v)); }
  JsonObject& Bool(std::string_view key, bool v) { return Raw(key, v ? "true" : "false"); }
  JsonObject& Num(std::string_view key, uint64_t v) { return Raw(key, std::to_string(v)); }
  JsonObject& Int(std::string_view key, long v) { return Raw(key, std::to_string(v)); }
  std::string Done() const {
    return first_ ? "{}" : "{" + body_ + "\n" + std::string(size_t(indent_), ' ') + "}";
  }

 private:
  int indent_;
  bool first_ = true;
  std::string body_;
};

std::string JsonStringArray(const std::vector<std::string>& v) {
  std::string out = "[";
  for (size_t i = 0; i < v.size(); ++i) out += (i ? ", " : "") + JsonString(v[i]);
  return out + "]";
}

// The devices hmmkit can drive: the emulated ones always, and every DRM device found.
void PrintDevicesText() {
  std::printf("\ndevices\n");
  std::printf("  %-10s %-28s %s\n", "emu", "software accelerator",
              "always available (hmmkit::svm, HMMKIT_DEVICE)");
  std::printf("  %-10s %-28s %s\n", "dmirror", "4 test_hmm devices",
              "always available (hmmkit/dmirror.h, HMMKIT_DMIRROR_MEMORY=memfd|drm)");
  const auto drm_devices = drm::ListDrmDevices();
  if (drm_devices.empty()) std::printf("  %-10s %s\n", "drm", "no DRM devices (/dev/dri is empty)");
  for (const auto& d : drm_devices) {
    const std::string driver = d.driver.name.empty()
                                   ? "?"
                                   : d.driver.name + " " + std::to_string(d.driver.major) + "." +
                                         std::to_string(d.driver.minor) + "." +
                                         std::to_string(d.driver.patch);
    std::printf("  %-10s %-28s card=%s render=%s bus=%s%s%s\n", "drm", driver.c_str(),
                d.card.empty() ? "-" : d.card.c_str(), d.render.empty() ? "-" : d.render.c_str(),
                d.bus.c_str(), d.error.empty() ? "" : " error: ", d.error.c_str());
  }
}

std::string DevicesJson() {
  std::string out = "[";
  const auto drm_devices = drm::ListDrmDevices();
  JsonObject emu(4), dmirror(4);
  emu.Str("kind", "emu").Str("driver", "software accelerator");
  dmirror.Str("kind", "dmirror").Str("driver", "test_hmm devices");
  out += "\n    " + emu.Done() + ",\n    " + dmirror.Done();
  for (const auto& d : drm_devices) {
    JsonObject o(4);
    o.Str("kind", "drm")
        .Str("driver", d.driver.name)
        .Int("major", d.driver.major)
        .Int("minor", d.driver.minor)
        .Int("patch", d.driver.patch)
        .Str("card", d.card)
        .Str("render", d.render)
        .Str("bus", d.bus)
        .Bool("from_libdrm", d.from_libdrm)
        .Str("error", d.error);
    out += ",\n    " + o.Done();
  }
  return out + "\n  ]";
}

void PrintJson(const KernelFeatures& f) {
  JsonObject bits(2);
  for (const auto& [name, bit] : UffdFeatureNames()) bits.Bool(name, f.has_uffd_feature(bit));

  std::string mechanisms = "[";
  const auto rows = ChooseMechanisms(f);
  for (size_t i = 0; i < rows.size(); ++i) {
    JsonObject m(4);
    m.Str("feature", rows[i].feature)
        .Str("mechanism", rows[i].mechanism)
        .Bool("degraded", rows[i].degraded)
        .Str("note", rows[i].note);
    mechanisms += (i ? ",\n    " : "\n    ") + m.Done();
  }
  mechanisms += rows.empty() ? "]" : "\n  ]";

  JsonObject root(0);
  root.Str("kernel_release", f.kernel_release)
      .Num("page_size", f.page_size)
      .Str("uffd_mode", ToString(f.uffd_mode))
      .Str("uffd_error", f.uffd_error)
      .Num("uffd_features", f.uffd_features)
      .Raw("uffd_feature_bits", bits.Done())
      .Num("uffd_ioctls", f.uffd_ioctls)
      .Bool("uffd_wp", f.uffd_wp)
      .Bool("uffd_wp_shmem", f.uffd_wp_shmem)
      .Bool("uffdio_move", f.uffdio_move)
      .Bool("uffd_poison", f.uffd_poison)
      .Bool("pagemap_scan", f.pagemap_scan)
      .Bool("procmap_query", f.procmap_query)
      .Bool("pagemap_pfns", f.pagemap_pfns)
      .Bool("kpageflags", f.kpageflags)
      .Num("zero_pfn", f.zero_pfn)
      .Bool("madv_populate", f.madv_populate)
      .Bool("madv_collapse", f.madv_collapse)
      .Str("thp", ToString(f.thp))
      .Str("thp_shmem", f.thp_shmem)
      .Num("hugetlb_page_size", f.hugetlb_page_size)
      .Int("hugetlb_total", f.hugetlb_total)
      .Int("hugetlb_free", f.hugetlb_free)
      .Raw("mechanisms", mechanisms)
      .Raw("disabled", JsonStringArray({f.disabled.begin(), f.disabled.end()}))
      .Raw("disabled_unknown", JsonStringArray(f.disabled_unknown))
      .Raw("devices", DevicesJson());
  std::printf("%s\n", root.Done().c_str());
}

}  // namespace

void InfoUsage(FILE* out, const char* indent) {
  std::fprintf(out, "%shmmctl info          features as a table\n", indent);
  std::fprintf(out, "%shmmctl info --json   the same facts as one JSON object\n", indent);
}

int InfoMain(std::span<char* const> args) {
  bool json = false;
  for (std::string_view a : args) {
    if (a == "--json") {
      json = true;
    } else if (a == "--help" || a == "-h") {
      std::printf("usage:\n");
      InfoUsage(stdout, "  ");
      return kExitOk;
    } else {
      std::fprintf(stderr, "hmmctl info: unknown option '%.*s'\nusage:\n", int(a.size()), a.data());
      InfoUsage(stderr, "  ");
      return kExitUsage;
    }
  }
  const KernelFeatures& f = KernelFeatures::Get();
  if (json)
    PrintJson(f);
  else {
    PrintText(f);
    PrintDevicesText();
  }
  if (std::fflush(stdout) != 0 || std::ferror(stdout)) {
    std::perror("hmmctl info: writing output");
    return kExitFailure;
  }
  return kExitOk;
}

}  // namespace hmmkit::hmmctl
