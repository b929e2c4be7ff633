//! Build script: makes the `ludus` binaries find libtorch at run time without
//! `LD_LIBRARY_PATH` (an rpath to libtorch's `lib/`), and keeps `libtorch_cuda` linked
//! even under `--as-needed`, so `tch::Cuda::is_available()` is true on GPU machines.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup first");
        return;
    };
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    if lib.join("libtorch_cuda.so").exists() {
        // Nothing in our code references libtorch_cuda's symbols directly: without
        // --no-as-needed the linker drops it and CUDA silently disappears.
        println!("cargo:rustc-link-arg=-Wl,--no-as-needed,-ltorch_cuda,--as-needed");
    }
}
