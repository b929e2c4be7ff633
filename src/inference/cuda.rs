//! libtorch's CUDA backend, opened at run time.
//!
//! `libtorch_cuda.so` and the CUDA libraries it pulls in (cuBLAS, cuDNN, NCCL, ...) cost
//! about 400 MiB of resident memory at start-up even where no GPU exists, so the binary
//! does not link them: they are opened here, once, when a GPU is asked for (`--device
//! cuda`) or when `--device auto` finds an NVIDIA driver. Opening the library runs its
//! static initializers, which register the CUDA hooks `tch::Cuda` asks.

use std::ffi::{CStr, CString};
use std::os::raw::{c_char, c_int, c_void};
use std::sync::OnceLock;

extern "C" {
    fn dlopen(filename: *const c_char, flags: c_int) -> *mut c_void;
    fn dlerror() -> *const c_char;
    // csrc/attention_backend.cpp
    fn ludus_disable_cudnn_attention();
    fn ludus_cudnn_attention_enabled() -> c_int;
}

const RTLD_NOW: c_int = 2;
const RTLD_GLOBAL: c_int = 0x100;

/// Opens `libtorch_cuda.so` (found through the binary's rpath or `LD_LIBRARY_PATH`) once;
/// the error says why it could not be opened.
pub fn load_backend() -> Result<(), String> {
    static LOADED: OnceLock<Result<(), String>> = OnceLock::new();
    LOADED
        .get_or_init(|| {
            let name = CString::new("libtorch_cuda.so").expect("no NUL in the name");
            // SAFETY: dlopen with a valid C string; the handle is kept for the process's life.
            let handle = unsafe { dlopen(name.as_ptr(), RTLD_NOW | RTLD_GLOBAL) };
            if handle.is_null() {
                // SAFETY: dlerror returns a thread-local C string or NULL.
                let why = unsafe { dlerror() };
                let why = if why.is_null() {
                    "unknown error".to_string()
                } else {
                    unsafe { CStr::from_ptr(why) }.to_string_lossy().into_owned()
                };
                return Err(format!("cannot open libtorch's CUDA backend ({why}); is this a CUDA build of libtorch?"));
            }
            disable_cudnn_attention();
            Ok(())
        })
        .clone()
}

/// Keeps libtorch from choosing cuDNN's fused attention: it plans its kernels for every new
/// key length, and a decoding sequence's grows each step (on an H200, bf16 decode ran 7x
/// slower with it). Memory-efficient attention is chosen instead (flash takes no mask).
pub fn disable_cudnn_attention() {
    // SAFETY: sets a flag in libtorch's global context; no arguments.
    unsafe { ludus_disable_cudnn_attention() }
}

/// Whether libtorch may still choose cuDNN's fused attention.
pub fn cudnn_attention_enabled() -> bool {
    // SAFETY: reads a flag in libtorch's global context.
    unsafe { ludus_cudnn_attention_enabled() != 0 }
}

/// Whether an NVIDIA driver is present (its device nodes or its /proc entry).
pub fn driver_present() -> bool {
    ["/dev/nvidiactl", "/proc/driver/nvidia/version"].iter().any(|p| std::path::Path::new(p).exists())
}

/// True when a CUDA device can be used: a driver is present and the backend opens.
pub fn available() -> bool {
    driver_present() && load_backend().is_ok() && tch::Cuda::is_available()
}
