// The emulated CUDA driver: the driver API entry points spectune's backend calls, for a process
// that loads this library as libcuda.so.1 (cuda/emulate.sh sets LD_LIBRARY_PATH). One device,
// "spectune CUDA emulator"; device memory is host memory; kernels are cuda/*.cu compiled for the
// host (runtime.cpp runs them). An entry point not defined here fails loudly by its name: Rust
// binaries bind every symbol at load (BIND_NOW), so the loader stops with "undefined symbol: cu…".
//
// Memory that catches bugs: every allocation ends exactly at a PROT_NONE guard page (a read or
// write one byte past the end faults, and the launch fails naming the kernel), starts filled
// with 0xff bytes (NaN as f32, bf16 and f64: a read of memory nobody wrote shows up as NaN), and
// all allocations together stay under a cap (SPECTUNE_EMU_MEM_MB, default 2048), so the
// out-of-memory path runs as on a full device.
//
// kernelParams: the driver reads one pointer per kernel parameter. spectune appends a null
// pointer, the word EMU_PARAMS_MAGIC and one word per argument (its size | class << 8), which a
// real driver never reads; here they are checked against the kernel's `.entry` in the PTX and
// against the host-compiled kernel's C++ signature, and pointer arguments must point into live
// device memory (or be null).
#include <ctype.h>
#include <cuda.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <string.h>
#include <sys/mman.h>
#include <unistd.h>

#include <map>
#include <mutex>
#include <string>
#include <vector>

#include "emu.h"

namespace emu {
namespace {

constexpr uint64_t kParamsMagic = 0x454d55504152414dull; // "MARAPUME": spectune's trailer
constexpr int kMajor = 8, kMinor = 0;                        // the kernels need sm_80

std::vector<KernelInfo>& registry() {
    static std::vector<KernelInfo> r;
    return r;
}

struct Alloc {
    uintptr_t start;
    size_t size;
    char* map;
    size_t maplen;
};
std::mutex g_mu;
std::map<uintptr_t, Alloc> g_allocs; // by start
size_t g_used = 0, g_cap = 0;
bool g_init = false;
Status g_sticky = OK; // a fault in a kernel poisons the context, as on a GPU
std::string g_sticky_detail;
size_t g_page = 4096;

thread_local std::string tl_detail;  // this thread's last failure, for cuGetErrorString
thread_local const char* tl_detail_of; // ...and the status it belongs to (its name)

struct Param {
    size_t size;
    char cls; // I (integer or pointer: PTX does not tell them apart), F, A
    std::string ptx_type;
};
struct Entry {
    std::string name;
    std::vector<Param> params;
    const KernelInfo* host;
};

const Alloc* find_alloc_locked(uintptr_t a) {
    auto it = g_allocs.upper_bound(a);
    if (it == g_allocs.begin()) return nullptr;
    --it;
    const Alloc& al = it->second;
    if (a >= (uintptr_t)al.map && a < (uintptr_t)al.map + al.maplen) return &al;
    return nullptr;
}

std::string hex(uintptr_t v) {
    char b[32];
    snprintf(b, sizeof b, "%#lx", (unsigned long)v);
    return b;
}

} // namespace

Status fail(Status s, const std::string& detail) {
    const char* name = "";
    cuGetErrorName((CUresult)s, &name);
    tl_detail = detail + " [CUDA (emulated)]";
    tl_detail_of = name;
    fprintf(stderr, "CUDA (emulated): %s: %s\n", name, tl_detail.c_str());
    return s;
}

std::string describe_address(uintptr_t a, bool* in_guard) {
    *in_guard = false;
    std::lock_guard<std::mutex> g(g_mu);
    const Alloc* al = find_alloc_locked(a);
    if (!al) return "not in any device allocation (a wild, freed or host pointer)";
    if (a >= al->start && a < al->start + al->size) return "";
    *in_guard = true;
    if (a >= al->start + al->size)
        return std::to_string(a - (al->start + al->size)) + " bytes past the end of the " + std::to_string(al->size) + "-byte allocation at " + hex(al->start);
    return std::to_string(al->start - a) + " bytes before the start of the " + std::to_string(al->size) + "-byte allocation at " + hex(al->start);
}

bool is_device_range(uintptr_t p, size_t n) {
    std::lock_guard<std::mutex> g(g_mu);
    const Alloc* al = find_alloc_locked(p);
    return al && p >= al->start && p + n <= al->start + al->size && p + n >= p;
}

void register_kernel(const KernelInfo& k) { registry().push_back(k); }

} // namespace emu

using namespace emu;

// Opaque handles.
struct CUctx_st {
    int device;
};
struct CUmod_st {
    std::map<std::string, Entry> entries;
};
struct CUfunc_st {
    const Entry* entry;
};
static CUctx_st g_ctx{0};
static thread_local CUcontext tl_ctx = nullptr;

#define STICKY()                                                                                                                           \
    do {                                                                                                                                   \
        if (!g_init) return (CUresult)fail(NOT_INITIALIZED, std::string(__func__) + " before cuInit");                                   \
        if (g_sticky != OK) return (CUresult)fail(g_sticky, std::string(__func__) + " after an earlier kernel fault: " + g_sticky_detail); \
    } while (0)

extern "C" {

CUresult cuGetErrorName(CUresult e, const char** s) {
    switch ((int)e) {
#define N(c, t)                                                                                                                            \
    case c: *s = t; return CUDA_SUCCESS;
        N(0, "CUDA_SUCCESS")
        N(1, "CUDA_ERROR_INVALID_VALUE")
        N(2, "CUDA_ERROR_OUT_OF_MEMORY")
        N(3, "CUDA_ERROR_NOT_INITIALIZED")
        N(200, "CUDA_ERROR_INVALID_IMAGE")
        N(201, "CUDA_ERROR_INVALID_CONTEXT")
        N(400, "CUDA_ERROR_INVALID_HANDLE")
        N(500, "CUDA_ERROR_NOT_FOUND")
        N(700, "CUDA_ERROR_ILLEGAL_ADDRESS")
        N(701, "CUDA_ERROR_LAUNCH_OUT_OF_RESOURCES")
        N(719, "CUDA_ERROR_LAUNCH_FAILED")
        N(801, "CUDA_ERROR_NOT_SUPPORTED")
#undef N
    default: *s = "CUDA_ERROR_UNKNOWN"; return CUDA_ERROR_INVALID_VALUE;
    }
}

// The detail of this thread's last failure (it names the call, kernel and values), else the name.
CUresult cuGetErrorString(CUresult e, const char** s) {
    const char* name = "";
    CUresult r = cuGetErrorName(e, &name);
    *s = tl_detail_of == name && !tl_detail.empty() ? tl_detail.c_str() : name;
    return r;
}

CUresult cuInit(unsigned flags) {
    if (flags != 0) return (CUresult)fail(INVALID_VALUE, "cuInit flags must be 0");
    std::lock_guard<std::mutex> g(g_mu);
    if (g_init) return CUDA_SUCCESS;
    g_page = (size_t)sysconf(_SC_PAGESIZE);
    const char* cap = getenv("SPECTUNE_EMU_MEM_MB");
    g_cap = (size_t)(cap ? atoll(cap) : 2048) << 20;
    install_fault_handler();
    g_init = true;
    fprintf(stderr, "CUDA (emulated): spectune's emulated driver, %zu kernels host-compiled, device memory cap %zu MiB\n", registry().size(), g_cap >> 20);
    return CUDA_SUCCESS;
}

CUresult cuDeviceGetCount(int* n) {
    STICKY();
    *n = 1;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGet(CUdevice* d, int ordinal) {
    STICKY();
    if (ordinal != 0) return (CUresult)fail(INVALID_VALUE, "cuDeviceGet: the emulation has one device, asked for " + std::to_string(ordinal));
    *d = 0;
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetName(char* name, int len, CUdevice d) {
    STICKY();
    if (d != 0 || len <= 0) return (CUresult)fail(INVALID_VALUE, "cuDeviceGetName: bad device or length");
    snprintf(name, (size_t)len, "spectune CUDA emulator (CPU) [CUDA (emulated)]");
    return CUDA_SUCCESS;
}
CUresult cuDeviceGetAttribute(int* v, CUdevice_attribute a, CUdevice d) {
    STICKY();
    if (d != 0) return (CUresult)fail(INVALID_VALUE, "cuDeviceGetAttribute: bad device");
    switch (a) {
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MAJOR: *v = kMajor; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_COMPUTE_CAPABILITY_MINOR: *v = kMinor; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_WARP_SIZE: *v = 32; return CUDA_SUCCESS;
    case CU_DEVICE_ATTRIBUTE_MAX_THREADS_PER_BLOCK: *v = 1024; return CUDA_SUCCESS;
    default: return (CUresult)fail(NOT_SUPPORTED, "cuDeviceGetAttribute: attribute " + std::to_string((int)a) + " is not emulated");
    }
}
CUresult cuDeviceTotalMem(size_t* bytes, CUdevice d) {
    STICKY();
    if (d != 0) return (CUresult)fail(INVALID_VALUE, "cuDeviceTotalMem: bad device");
    *bytes = g_cap;
    return CUDA_SUCCESS;
}
CUresult cuDevicePrimaryCtxRetain(CUcontext* c, CUdevice d) {
    STICKY();
    if (d != 0) return (CUresult)fail(INVALID_VALUE, "cuDevicePrimaryCtxRetain: bad device");
    *c = &g_ctx;
    return CUDA_SUCCESS;
}
CUresult cuCtxSetCurrent(CUcontext c) {
    STICKY();
    if (c && c != &g_ctx) return (CUresult)fail(INVALID_CONTEXT, "cuCtxSetCurrent: not the emulator's context");
    tl_ctx = c;
    return CUDA_SUCCESS;
}
#define NEED_CTX()                                                                                                                         \
    do {                                                                                                                                   \
        STICKY();                                                                                                                          \
        if (!tl_ctx) return (CUresult)fail(INVALID_CONTEXT, std::string(__func__) + " with no current context on this thread");            \
    } while (0)

CUresult cuCtxSynchronize() {
    NEED_CTX();
    return CUDA_SUCCESS; // launches and copies complete before they return
}

// ---- memory

CUresult cuMemAlloc(CUdeviceptr* p, size_t bytes) {
    NEED_CTX();
    if (bytes == 0) return (CUresult)fail(INVALID_VALUE, "cuMemAlloc of 0 bytes");
    std::lock_guard<std::mutex> g(g_mu);
    if (bytes > g_cap - g_used) {
        tl_detail_of = nullptr;
        return CUDA_ERROR_OUT_OF_MEMORY; // spectune's allocator reports asked vs free itself
    }
    size_t body = (bytes + g_page - 1) / g_page * g_page;
    size_t len = body + 2 * g_page;
    char* m = (char*)mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED || mprotect(m + g_page, body, PROT_READ | PROT_WRITE) != 0)
        return (CUresult)fail(OUT_OF_MEMORY, "cuMemAlloc: the host could not map " + std::to_string(len) + " bytes");
    // The block ends where the trailing guard page starts; its alignment is the largest power of
    // two dividing `bytes` (at least the element size of what it holds).
    uintptr_t start = (uintptr_t)(m + g_page + body - bytes);
    memset(m + g_page, 0xff, body);
    g_allocs[start] = Alloc{start, bytes, m, len};
    g_used += bytes;
    *p = (CUdeviceptr)start;
    return CUDA_SUCCESS;
}

CUresult cuMemFree(CUdeviceptr p) {
    NEED_CTX();
    std::lock_guard<std::mutex> g(g_mu);
    auto it = g_allocs.find((uintptr_t)p);
    if (it == g_allocs.end()) return (CUresult)fail(INVALID_VALUE, "cuMemFree of " + hex(p) + ", which is not the start of a live allocation");
    munmap(it->second.map, it->second.maplen);
    g_used -= it->second.size;
    g_allocs.erase(it);
    return CUDA_SUCCESS;
}

CUresult cuMemGetInfo(size_t* free_, size_t* total) {
    NEED_CTX();
    std::lock_guard<std::mutex> g(g_mu);
    *free_ = g_cap - g_used;
    *total = g_cap;
    return CUDA_SUCCESS;
}

static CUresult check_range(const char* call, CUdeviceptr p, size_t n) {
    if (n == 0 || is_device_range((uintptr_t)p, n)) return CUDA_SUCCESS;
    bool guard;
    std::string d = describe_address((uintptr_t)p, &guard);
    return (CUresult)fail(INVALID_VALUE, std::string(call) + " of " + std::to_string(n) + " bytes at " + hex(p) + ": " +
                                             (d.empty() ? "runs past the end of its allocation" : d));
}

CUresult cuMemcpyHtoD(CUdeviceptr dst, const void* src, size_t n) {
    NEED_CTX();
    CUresult r = check_range("cuMemcpyHtoD", dst, n);
    if (r == CUDA_SUCCESS && n) memcpy((void*)dst, src, n);
    return r;
}
CUresult cuMemcpyDtoH(void* dst, CUdeviceptr src, size_t n) {
    NEED_CTX();
    CUresult r = check_range("cuMemcpyDtoH", src, n);
    if (r == CUDA_SUCCESS && n) memcpy(dst, (const void*)src, n);
    return r;
}
CUresult cuMemcpyDtoD(CUdeviceptr dst, CUdeviceptr src, size_t n) {
    NEED_CTX();
    CUresult r = check_range("cuMemcpyDtoD (destination)", dst, n);
    if (r == CUDA_SUCCESS) r = check_range("cuMemcpyDtoD (source)", src, n);
    if (r == CUDA_SUCCESS && n) memmove((void*)dst, (const void*)src, n);
    return r;
}
CUresult cuMemsetD8(CUdeviceptr dst, unsigned char v, size_t n) {
    NEED_CTX();
    CUresult r = check_range("cuMemsetD8", dst, n);
    if (r == CUDA_SUCCESS && n) memset((void*)dst, v, n);
    return r;
}

// ---- modules: the PTX is parsed for each `.entry` and its parameter list

static bool parse_entries(const char* ptx, std::map<std::string, Entry>& out, std::string& err) {
    std::string s(ptx);
    size_t pos = 0;
    while ((pos = s.find(".entry ", pos)) != std::string::npos) {
        size_t name0 = pos + 7, open = s.find('(', name0);
        if (open == std::string::npos) return err = "unterminated .entry", false;
        std::string name = s.substr(name0, open - name0);
        while (!name.empty() && isspace((unsigned char)name.back())) name.pop_back();
        size_t close = s.find(')', open);
        if (close == std::string::npos) return err = ".entry " + name + " has no closing parenthesis", false;
        Entry e;
        e.name = name;
        std::string list = s.substr(open + 1, close - open - 1);
        size_t p = 0;
        while ((p = list.find(".param", p)) != std::string::npos) {
            size_t end = list.find(',', p);
            std::string decl = list.substr(p, end == std::string::npos ? std::string::npos : end - p);
            p += 6;
            // ".param .u64 name" | ".param .align 4 .b8 name[32]"
            Param prm{0, 'I', ""};
            size_t lb = decl.find('[');
            if (lb != std::string::npos) {
                prm.size = (size_t)atol(decl.c_str() + lb + 1);
                prm.cls = 'A';
                prm.ptx_type = ".b8[" + std::to_string(prm.size) + "]";
            } else {
                size_t t = decl.find('.', 6);
                if (t == std::string::npos) return err = ".entry " + name + ": cannot read parameter '" + decl + "'", false;
                std::string ty = decl.substr(t + 1, decl.find(' ', t) - t - 1);
                char k = ty[0];
                int bits = atoi(ty.c_str() + 1);
                if (!(k == 'u' || k == 's' || k == 'b' || k == 'f') || bits % 8) return err = ".entry " + name + ": parameter type ." + ty, false;
                prm.size = (size_t)bits / 8;
                prm.cls = k == 'f' ? 'F' : 'I';
                prm.ptx_type = "." + ty;
            }
            e.params.push_back(prm);
        }
        out[name] = e;
        pos = close;
    }
    return true;
}

CUresult cuModuleLoadData(CUmodule* m, const void* image) {
    NEED_CTX();
    if (!image) return (CUresult)fail(INVALID_VALUE, "cuModuleLoadData with a null image");
    auto* mod = new CUmod_st;
    std::string err;
    if (!parse_entries((const char*)image, mod->entries, err)) {
        delete mod;
        return (CUresult)fail(INVALID_IMAGE, "cuModuleLoadData: " + err);
    }
    if (mod->entries.empty()) {
        delete mod;
        return (CUresult)fail(INVALID_IMAGE, "cuModuleLoadData: no .entry in the image (the emulation takes PTX text)");
    }
    for (auto& kv : mod->entries) {
        Entry& e = kv.second;
        e.host = nullptr;
        for (auto& k : registry())
            if (e.name == k.name) e.host = &k;
        if (!e.host) {
            delete mod;
            return (CUresult)fail(INVALID_IMAGE, "kernel " + kv.first + " is in the PTX but has no host-compiled twin (rebuild the emulated driver: cuda/emulate.sh build)");
        }
        // The host compile of the same source must agree with nvcc's view of the signature.
        const KernelInfo& k = *e.host;
        std::string why;
        if ((size_t)k.nparams != e.params.size()) why = std::to_string(k.nparams) + " host parameters vs " + std::to_string(e.params.size()) + " in the PTX";
        for (size_t i = 0; why.empty() && i < e.params.size(); ++i) {
            char hc = k.classes[i] == 'P' ? 'I' : k.classes[i];
            if (k.sizes[i] != e.params[i].size || hc != e.params[i].cls)
                why = "parameter " + std::to_string(i) + " is " + std::to_string(k.sizes[i]) + " bytes (" + k.classes[i] + ") on the host, " +
                      e.params[i].ptx_type + " in the PTX";
        }
        if (!why.empty()) {
            delete mod;
            return (CUresult)fail(INVALID_IMAGE, "kernel " + kv.first + " (" + k.file + "): host and PTX signatures differ: " + why);
        }
    }
    *m = mod;
    return CUDA_SUCCESS;
}

CUresult cuModuleGetFunction(CUfunction* f, CUmodule m, const char* name) {
    NEED_CTX();
    if (!m || !name) return (CUresult)fail(INVALID_HANDLE, "cuModuleGetFunction: null module or name");
    auto it = m->entries.find(name);
    if (it == m->entries.end()) {
        tl_detail_of = nullptr; // spectune probes each module in turn: not finding it here is normal
        return CUDA_ERROR_NOT_FOUND;
    }
    *f = new CUfunc_st{&it->second};
    return CUDA_SUCCESS;
}

static const char* cls_name(char c) {
    switch (c) {
    case 'P': return "pointer";
    case 'I': return "integer";
    case 'F': return "float";
    case 'A': return "struct";
    default: return "?";
    }
}

CUresult cuLaunchKernel(CUfunction f, unsigned gx, unsigned gy, unsigned gz, unsigned bx, unsigned by, unsigned bz, unsigned shmem, CUstream stream,
                        void** params, void** extra) {
    NEED_CTX();
    if (!f) return (CUresult)fail(INVALID_HANDLE, "cuLaunchKernel with a null function");
    const Entry& e = *f->entry;
    const KernelInfo& k = *e.host;
    std::string name = "kernel " + e.name;
    if (extra) return (CUresult)fail(NOT_SUPPORTED, name + ": `extra` launch parameters are not emulated (pass kernelParams)");
    if (shmem) return (CUresult)fail(NOT_SUPPORTED, name + ": dynamic shared memory is not emulated");
    if (stream) return (CUresult)fail(NOT_SUPPORTED, name + ": only the default stream is emulated");
    unsigned long threads = (unsigned long)bx * by * bz;
    if (!gx || !gy || !gz || !bx || !by || !bz || threads > 1024 || bz > 64 || gy > 65535 || gz > 65535)
        return (CUresult)fail(INVALID_VALUE, name + ": launch configuration grid (" + std::to_string(gx) + "," + std::to_string(gy) + "," +
                                                 std::to_string(gz) + ") block (" + std::to_string(bx) + "," + std::to_string(by) + "," +
                                                 std::to_string(bz) + ") is out of range");
    if (!params && !e.params.empty()) return (CUresult)fail(INVALID_VALUE, name + ": null kernelParams for " + std::to_string(e.params.size()) + " parameters");
    // The caller's argument list, from the trailer after the pointers (see the file comment).
    size_t n = e.params.size();
    size_t count = 0;
    while (count < 256 && params[count]) ++count;
    if (count != n)
        return (CUresult)fail(INVALID_VALUE, name + " (" + k.file + ") takes " + std::to_string(n) + " parameters, the caller passed " + std::to_string(count));
    if ((uint64_t)(uintptr_t)params[n + 1] != kParamsMagic)
        return (CUresult)fail(INVALID_VALUE, name + ": kernelParams lack the argument-size trailer the emulation checks (null, magic, sizes)");
    for (size_t i = 0; i < n; ++i) {
        uint64_t w = (uint64_t)(uintptr_t)params[n + 2 + i];
        size_t size = w & 0xff;
        char cls = (char)((w >> 8) & 0xff);
        const Param& p = e.params[i];
        char host = k.classes[i];
        bool ok = size == p.size && (cls == host || (cls == 'I' && host == 'I'));
        if (!ok)
            return (CUresult)fail(INVALID_VALUE, name + " (" + k.file + "): parameter " + std::to_string(i) + " is a " + std::to_string(p.size) + "-byte " +
                                                     cls_name(host) + " (PTX " + p.ptx_type + "), the caller passed a " + std::to_string(size) +
                                                     "-byte " + cls_name(cls));
        if (host == 'P') {
            uintptr_t v;
            memcpy(&v, params[i], sizeof v);
            if (v && !is_device_range(v, 1)) {
                bool guard;
                std::string d = describe_address(v, &guard);
                return (CUresult)fail(INVALID_VALUE, name + ": parameter " + std::to_string(i) + " (a pointer) is " + hex(v) + ", " +
                                                         (d.empty() ? "at the end of its allocation" : d));
            }
        }
    }
    Launch l{&k, params, {gx, gy, gz}, {bx, by, bz}};
    Status s = run_grid(l);
    if (s == ILLEGAL_ADDRESS || s == LAUNCH_FAILED) {
        std::lock_guard<std::mutex> g(g_mu);
        g_sticky = s;
        g_sticky_detail = tl_detail;
    }
    return (CUresult)s;
}

} // extern "C"
