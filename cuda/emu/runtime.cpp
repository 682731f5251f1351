// Running a grid: blocks one after another on the calling thread; a block's threads as fibers
// with their own small stacks, switched cooperatively. A fiber runs until it reaches a
// rendezvous (__syncthreads, a warp shuffle, the tensor-core mma) or returns; the scheduler
// resumes the waiting fibers once every live thread of the block (or lane of the warp) has
// arrived, and reports a deadlock or a divergent warp instead of hanging. A SIGSEGV/SIGBUS while
// a kernel runs (a guard page behind every device allocation, a fiber's stack guard) ends the
// launch with CUDA_ERROR_ILLEGAL_ADDRESS naming the kernel, block, thread and address.
#include <setjmp.h>
#include <signal.h>
#include <stdio.h>
#include <stdlib.h>
#include <sys/mman.h>
#include <unistd.h>

#include <algorithm>
#include <string>
#include <vector>

#include "emu.h"

thread_local EmuCoords emu_coords;

#if !defined(__x86_64__)
#error "the emulated driver's fiber switch is written for x86-64"
#endif

// emu_switch(save, to): saves the callee-saved registers, MXCSR and the x87 control word on the
// current stack, stores the stack pointer in *save, and continues on stack `to` (a stack
// saved by emu_switch, or a fresh frame whose return address is emu_fiber_start).
extern "C" void emu_switch(void** save, void* to);
extern "C" void emu_fiber_start();
__asm__(R"(
    .text
    .globl emu_switch
    .type emu_switch, @function
emu_switch:
    pushq %rbp
    pushq %rbx
    pushq %r12
    pushq %r13
    pushq %r14
    pushq %r15
    subq $8, %rsp
    stmxcsr (%rsp)
    fnstcw 4(%rsp)
    movq %rsp, (%rdi)
    movq %rsi, %rsp
    ldmxcsr (%rsp)
    fldcw 4(%rsp)
    addq $8, %rsp
    popq %r15
    popq %r14
    popq %r13
    popq %r12
    popq %rbx
    popq %rbp
    ret
    .size emu_switch, .-emu_switch

    .globl emu_fiber_start
    .type emu_fiber_start, @function
emu_fiber_start:
    movq %r12, %rdi
    callq *%r13
    ud2
    .size emu_fiber_start, .-emu_fiber_start
)");

namespace emu {
namespace {

constexpr size_t kStack = 64 << 10; // per thread; kernels keep a few hundred bytes of locals
constexpr size_t kGuard = 4096;
constexpr int kMaxThreads = 1024;

enum State { READY, AT_WARP, AT_BLOCK, EXITED };
enum Op { SHFL = 1, MMA = 2 };

struct Fiber {
    void* sp;
    State st;
    uint3 tid;
    int lin, lane, warp;
    // The posted warp operation.
    Op op;
    int mode, arg, width;
    unsigned mask, bits, result;
    float* d;
    const unsigned *a, *b;
};

struct Run {
    const Launch* l;
    std::vector<Fiber> fibers;
    std::vector<int> warp_live, warp_arrived;
    int live = 0, at_block = 0, nthreads = 0;
    void* sched_sp = nullptr;
    Fiber* cur = nullptr;
    bool failed = false;
    Status status = OK;
    std::string detail;
    bool in_kernel = false;
    sigjmp_buf jb;
};

thread_local Run* tl_run;

// One pool of fiber stacks per OS thread, each with a PROT_NONE guard page below it.
struct Stacks {
    char* base = nullptr;
    size_t stride = kStack + kGuard;
    char* top(int i) const { return base + (size_t)i * stride + stride; }
    bool in_guard(uintptr_t a, int* which) const {
        if (!base || a < (uintptr_t)base || a >= (uintptr_t)base + kMaxThreads * stride) return false;
        size_t off = a - (uintptr_t)base;
        *which = (int)(off / stride);
        return off % stride < kGuard;
    }
};
thread_local Stacks tl_stacks;
thread_local char* tl_altstack;

bool ensure_stacks() {
    if (tl_stacks.base) return true;
    size_t len = (size_t)kMaxThreads * tl_stacks.stride;
    void* m = mmap(nullptr, len, PROT_NONE, MAP_PRIVATE | MAP_ANONYMOUS | MAP_NORESERVE, -1, 0);
    if (m == MAP_FAILED) return false;
    tl_stacks.base = (char*)m;
    for (int i = 0; i < kMaxThreads; ++i)
        if (mprotect(tl_stacks.base + (size_t)i * tl_stacks.stride + kGuard, kStack, PROT_READ | PROT_WRITE) != 0) return false;
    // The fault handler runs on an alternate stack (a fiber's own stack may be the one that
    // overflowed); Rust threads have one already, other threads get one here.
    stack_t ss;
    if (sigaltstack(nullptr, &ss) == 0 && (ss.ss_flags & SS_DISABLE)) {
        size_t n = 1 << 16;
        tl_altstack = (char*)malloc(n);
        stack_t s{};
        s.ss_sp = tl_altstack;
        s.ss_size = n;
        sigaltstack(&s, nullptr);
    }
    return true;
}

std::string coords(const Run& r, const Fiber* f) {
    char b[160];
    snprintf(b, sizeof b, "kernel %s, block (%u,%u,%u), thread (%u,%u,%u)", r.l->kernel->name, emu_coords.bid.x, emu_coords.bid.y, emu_coords.bid.z,
             f ? f->tid.x : 0, f ? f->tid.y : 0, f ? f->tid.z : 0);
    return b;
}

void set_fail(Run& r, Status s, const std::string& what) {
    if (r.failed) return;
    r.failed = true;
    r.status = s;
    r.detail = what;
}

extern "C" void emu_fiber_main(Fiber* f) {
    Run* r = tl_run;
    r->l->kernel->invoke(r->l->kernel->fn, r->l->params);
    f->st = EXITED;
    emu_switch(&f->sp, r->sched_sp);
    abort(); // an exited fiber is never resumed
}

void yield_to_scheduler(Fiber* f) {
    Run* r = tl_run;
    emu_switch(&f->sp, r->sched_sp);
}

Fiber* current(const char* what) {
    Run* r = tl_run;
    if (!r || !r->cur) {
        fprintf(stderr, "CUDA (emulated): %s called outside a kernel launch\n", what);
        abort();
    }
    return r->cur;
}

const char* op_name(const Fiber& f) {
    if (f.st == AT_BLOCK) return "__syncthreads";
    if (f.op == MMA) return "mma.m16n8k16";
    static const char* m[] = {"__shfl_xor_sync", "__shfl_down_sync", "__shfl_up_sync", "__shfl_sync"};
    return m[f.mode & 3];
}

// The warp's lanes [w·32, w·32 + 32) ∩ [0, nthreads) have all arrived: check they posted the
// same operation over the full warp, then do it.
void complete_warp(Run& r, int w) {
    int lo = w * 32, hi = std::min(r.nthreads, lo + 32);
    Fiber* fs = &r.fibers[lo];
    int n = hi - lo;
    for (int i = 0; i < n; ++i) {
        if (fs[i].st == EXITED || fs[i].st == AT_WARP) continue;
        return; // a lane still running or at __syncthreads: not complete
    }
    Fiber* first = nullptr;
    for (int i = 0; i < n; ++i)
        if (fs[i].st == AT_WARP) {
            first = &fs[i];
            break;
        }
    if (!first) return;
    for (int i = 0; i < n; ++i) {
        Fiber& f = fs[i];
        if (f.st == EXITED) {
            set_fail(r, LAUNCH_FAILED,
                     coords(r, first) + ": " + op_name(*first) + " over the full warp, but lane " + std::to_string(i) +
                         " has already returned (a warp-wide operation needs every lane)");
            return;
        }
        if (f.op != first->op || (f.op == SHFL && f.mode != first->mode)) {
            set_fail(r, LAUNCH_FAILED, coords(r, &f) + ": divergent warp: lane " + std::to_string(i) + " is at " + op_name(f) + ", lane " +
                                           std::to_string(first->lane) + " at " + op_name(*first));
            return;
        }
    }
    if (n < 32) {
        set_fail(r, LAUNCH_FAILED, coords(r, first) + ": " + op_name(*first) + " in a partial warp of " + std::to_string(n) +
                                       " lanes (blockDim " + std::to_string(r.nthreads) + " is not a multiple of 32)");
        return;
    }
    if (first->op == SHFL) {
        for (int i = 0; i < 32; ++i) {
            Fiber& f = fs[i];
            if (f.mask != 0xffffffffu) {
                char m[16];
                snprintf(m, sizeof m, "%#x", f.mask);
                set_fail(r, NOT_SUPPORTED, coords(r, &f) + ": " + op_name(f) + " with mask " + m + " (the emulation supports full-warp masks only)");
                return;
            }
            int width = f.width, base = i & ~(width - 1), src = i;
            if (width < 1 || width > 32 || (width & (width - 1))) {
                set_fail(r, INVALID_VALUE, coords(r, &f) + ": shuffle width " + std::to_string(width) + " is not a power of two ≤ 32");
                return;
            }
            switch (f.mode) {
            case 0: src = i ^ f.arg; break;
            case 1: src = i + f.arg; break;
            case 2: src = i - f.arg; break;
            default: src = base + (f.arg & (width - 1)); break;
            }
            if (src < base || src >= base + width) src = i;
            f.result = fs[src].bits;
        }
    } else {
        // D = A·B + C over the 16×16×8 tile from the fragments (layouts in cuda/common.cuh):
        // each bf16 product is exact in f64, the 16 products and C are summed in f64 and rounded
        // once to f32 (the hardware's internal accumulation order and rounding are not modelled).
        double A[16][16], B[16][8], C[16][8];
        auto bf = [](unsigned bits) {
            unsigned u = bits << 16;
            float x;
            memcpy(&x, &u, 4);
            return (double)x;
        };
        for (int i = 0; i < 32; ++i) {
            int g = i >> 2, t = i & 3;
            const unsigned* a = fs[i].a;
            const unsigned* b = fs[i].b;
            for (int h = 0; h < 2; ++h) {
                A[g][2 * t + h] = bf((a[0] >> (16 * h)) & 0xffff);
                A[g + 8][2 * t + h] = bf((a[1] >> (16 * h)) & 0xffff);
                A[g][2 * t + 8 + h] = bf((a[2] >> (16 * h)) & 0xffff);
                A[g + 8][2 * t + 8 + h] = bf((a[3] >> (16 * h)) & 0xffff);
                B[2 * t + h][g] = bf((b[0] >> (16 * h)) & 0xffff);
                B[2 * t + 8 + h][g] = bf((b[1] >> (16 * h)) & 0xffff);
                C[g][2 * t + h] = fs[i].d[h];
                C[g + 8][2 * t + h] = fs[i].d[2 + h];
            }
        }
        for (int i = 0; i < 32; ++i) {
            int g = i >> 2, t = i & 3;
            for (int q = 0; q < 4; ++q) {
                int row = g + (q >> 1) * 8, col = 2 * t + (q & 1);
                double s = C[row][col];
                for (int k = 0; k < 16; ++k) s += A[row][k] * B[k][col];
                fs[i].d[q] = (float)s;
            }
        }
    }
    for (int i = 0; i < n; ++i) fs[i].st = READY;
    r.warp_arrived[w] = 0;
}

void check_block(Run& r, const Fiber* last) {
    if (r.at_block == 0 || r.at_block < r.live) return;
    if (r.live < r.nthreads) {
        set_fail(r, LAUNCH_FAILED, coords(r, last) + ": __syncthreads reached after " + std::to_string(r.nthreads - r.live) + " of the block's " +
                                       std::to_string(r.nthreads) + " threads returned (barrier in divergent code)");
        return;
    }
    for (auto& f : r.fibers) f.st = READY;
    r.at_block = 0;
}

void init_fiber(Fiber& f, int i) {
    // A fresh frame as emu_switch leaves it: [mxcsr|fpcw][r15][r14][r13][r12][rbx][rbp][ret].
    uint64_t* sp = (uint64_t*)(tl_stacks.top(i) - 64);
    uint32_t* csr = (uint32_t*)sp;
    csr[0] = 0x1f80; // MXCSR: round to nearest, exceptions masked
    csr[1] = 0x037f; // x87 control word default
    sp[1] = 0;
    sp[2] = 0;
    sp[3] = (uint64_t)(uintptr_t)&emu_fiber_main; // r13: entry
    sp[4] = (uint64_t)(uintptr_t)&f;              // r12: its argument
    sp[5] = 0;
    sp[6] = 0;
    sp[7] = (uint64_t)(uintptr_t)&emu_fiber_start;
    f.sp = sp;
    f.st = READY;
}

void run_block(Run& r) {
    const unsigned* bd = r.l->block;
    int n = r.nthreads;
    for (int i = 0; i < n; ++i) {
        Fiber& f = r.fibers[i];
        f.tid = {(unsigned)(i % bd[0]), (unsigned)(i / bd[0] % bd[1]), (unsigned)(i / (bd[0] * bd[1]))};
        f.lin = i;
        f.lane = i & 31;
        f.warp = i >> 5;
        init_fiber(f, i);
    }
    for (size_t w = 0; w < r.warp_live.size(); ++w) {
        r.warp_live[w] = std::min(32, n - (int)w * 32);
        r.warp_arrived[w] = 0;
    }
    r.live = n;
    r.at_block = 0;
    while (r.live > 0 && !r.failed) {
        bool progress = false;
        for (int i = 0; i < n && !r.failed; ++i) {
            Fiber& f = r.fibers[i];
            if (f.st != READY) continue;
            progress = true;
            r.cur = &f;
            emu_coords.tid = f.tid;
            emu_switch(&r.sched_sp, f.sp);
            r.cur = nullptr;
            switch (f.st) {
            case EXITED:
                --r.live;
                --r.warp_live[f.warp];
                if (r.warp_arrived[f.warp] > 0) complete_warp(r, f.warp);
                break;
            case AT_WARP:
                ++r.warp_arrived[f.warp];
                if (r.warp_arrived[f.warp] == r.warp_live[f.warp]) complete_warp(r, f.warp);
                break;
            case AT_BLOCK: ++r.at_block; break;
            case READY: break;
            }
            check_block(r, &f);
        }
        if (!progress && !r.failed) {
            int wb = 0, ww = 0;
            const Fiber* ex = nullptr;
            for (auto& f : r.fibers) {
                if (f.st == AT_BLOCK) ++wb, ex = ex ? ex : &f;
                if (f.st == AT_WARP) ++ww, ex = ex ? ex : &f;
            }
            set_fail(r, LAUNCH_FAILED, coords(r, ex) + ": deadlock: " + std::to_string(wb) + " threads wait at __syncthreads, " + std::to_string(ww) +
                                           " at warp operations, " + std::to_string(n - r.live) +
                                           " have returned (a barrier or warp operation not reached by all threads)");
        }
    }
}

struct sigaction g_old_segv, g_old_bus;

void on_fault(int sig, siginfo_t* si, void* uc) {
    Run* r = tl_run;
    if (r && r->in_kernel) {
        uintptr_t a = (uintptr_t)si->si_addr;
        int which = -1;
        std::string where;
        if (tl_stacks.in_guard(a, &which)) {
            where = "stack overflow of the thread's fiber (" + std::to_string(kStack >> 10) + " KiB per thread in the emulation)";
        } else {
            bool guard = false;
            std::string d = describe_address(a, &guard);
            char b[64];
            snprintf(b, sizeof b, "%s at %#lx: ", guard ? "out-of-bounds access" : "illegal address", (unsigned long)a);
            where = b + (d.empty() ? std::string("inside a device allocation (protection fault)") : d);
        }
        set_fail(*r, ILLEGAL_ADDRESS, coords(*r, r->cur) + ": " + where);
        siglongjmp(r->jb, 1);
    }
    // Not a kernel's fault: hand it to whoever had the handler before (Rust's stack-overflow
    // check), or let the default action happen.
    struct sigaction* old = sig == SIGBUS ? &g_old_bus : &g_old_segv;
    if ((old->sa_flags & SA_SIGINFO) && old->sa_sigaction) {
        old->sa_sigaction(sig, si, uc);
        return;
    }
    if (old->sa_handler != SIG_DFL && old->sa_handler != SIG_IGN) {
        old->sa_handler(sig);
        return;
    }
    signal(sig, SIG_DFL); // returning re-runs the faulting access, which now kills the process
}

} // namespace

void install_fault_handler() {
    struct sigaction sa {};
    sa.sa_sigaction = on_fault;
    sa.sa_flags = SA_SIGINFO | SA_ONSTACK | SA_NODEFER;
    sigemptyset(&sa.sa_mask);
    sigaction(SIGSEGV, &sa, &g_old_segv);
    sigaction(SIGBUS, &sa, &g_old_bus);
}

Status run_grid(const Launch& l) {
    if (!ensure_stacks()) return fail(OUT_OF_MEMORY, "cannot map the fiber stacks for kernel " + std::string(l.kernel->name));
    Run r;
    r.l = &l;
    r.nthreads = (int)(l.block[0] * l.block[1] * l.block[2]);
    r.fibers.assign(r.nthreads, Fiber{});
    r.warp_live.assign((r.nthreads + 31) / 32, 0);
    r.warp_arrived.assign(r.warp_live.size(), 0);
    Run* saved = tl_run;
    EmuCoords saved_coords = emu_coords;
    tl_run = &r;
    emu_coords.gdim = {l.grid[0], l.grid[1], l.grid[2]};
    emu_coords.bdim = {l.block[0], l.block[1], l.block[2]};
    if (sigsetjmp(r.jb, 1) == 0) {
        r.in_kernel = true;
        for (unsigned z = 0; z < l.grid[2] && !r.failed; ++z)
            for (unsigned y = 0; y < l.grid[1] && !r.failed; ++y)
                for (unsigned x = 0; x < l.grid[0] && !r.failed; ++x) {
                    emu_coords.bid = {x, y, z};
                    run_block(r);
                }
    }
    r.in_kernel = false;
    tl_run = saved;
    emu_coords = saved_coords;
    if (r.failed) return fail(r.status, r.detail);
    return OK;
}

} // namespace emu

using namespace emu;

void emu_syncthreads() {
    Fiber* f = current("__syncthreads");
    f->st = AT_BLOCK;
    yield_to_scheduler(f);
}

unsigned emu_shfl(int mode, unsigned mask, unsigned bits, int arg, int width) {
    Fiber* f = current("a warp shuffle");
    f->op = SHFL;
    f->mode = mode;
    f->mask = mask;
    f->bits = bits;
    f->arg = arg;
    f->width = width;
    f->st = AT_WARP;
    yield_to_scheduler(f);
    return f->result;
}

void emu_mma_m16n8k16_bf16(float (&d)[4], const unsigned (&a)[4], const unsigned (&b)[2]) {
    Fiber* f = current("mma.m16n8k16");
    f->op = MMA;
    f->mask = 0xffffffffu;
    f->d = d;
    f->a = a;
    f->b = b;
    f->st = AT_WARP;
    yield_to_scheduler(f);
}
