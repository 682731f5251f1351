// Internal interface between the emulated driver's parts: driver.cpp (the cu* entry points,
// device memory, PTX signatures) and runtime.cpp (running a grid: fibers, rendezvous, faults).
#pragma once

#include <stddef.h>
#include <stdint.h>

#include <string>

#include "cuda_host.h"

namespace emu {

// A driver status (the CUresult values the emulation returns).
enum Status : int {
    OK = 0,
    INVALID_VALUE = 1,
    OUT_OF_MEMORY = 2,
    NOT_INITIALIZED = 3,
    INVALID_IMAGE = 200,
    INVALID_CONTEXT = 201,
    INVALID_HANDLE = 400,
    NOT_FOUND = 500,
    ILLEGAL_ADDRESS = 700,
    LAUNCH_OUT_OF_RESOURCES = 701,
    LAUNCH_FAILED = 719,
    NOT_SUPPORTED = 801,
};

// Sets the detail that cuGetErrorString returns for `s` on this thread and prints it once to
// stderr prefixed "CUDA (emulated)"; returns `s`.
Status fail(Status s, const std::string& detail);

// Where `addr` lies relative to the device allocations (for fault messages); empty when it is
// inside a live allocation; `in_guard` tells whether it is in an allocation's guard page. The
// fault handler calls it (taking the table's lock and allocating) before it leaves the kernel
// with siglongjmp: not async-signal-safe in general, but the faulting kernel code holds no
// lock and does not allocate.
std::string describe_address(uintptr_t addr, bool* in_guard);
// True when [p, p + n) lies inside one live allocation.
bool is_device_range(uintptr_t p, size_t n);

struct Launch {
    const KernelInfo* kernel;
    void** params;
    unsigned grid[3], block[3];
};
// Runs the whole grid on the calling thread; returns OK or the failure (its detail set).
Status run_grid(const Launch& l);

// Installs the SIGSEGV/SIGBUS handler that turns a fault inside a kernel into ILLEGAL_ADDRESS.
void install_fault_handler();

} // namespace emu
