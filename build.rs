//! Build script: makes the `ludus` binaries find libtorch at run time without
//! `LD_LIBRARY_PATH` (an rpath to libtorch's `lib/`). `libtorch_cuda` is deliberately not
//! linked: loading it and the CUDA libraries behind it costs about 250 MiB of resident
//! memory even on a machine without a GPU, so `inference::cuda` opens it at run time
//! only when a GPU is asked for or present.
//! It also compiles `csrc/`, the small C++ shim over libtorch functions tch does not bind
//! (fbgemm's int8 GEMM), the int4 weight dequantization for prefill and the fused batch-1
//! int4 decode step, against the same libtorch headers.

use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-env-changed=LIBTORCH");
    println!("cargo:rerun-if-changed=build.rs");
    println!("cargo:rerun-if-changed=csrc");
    let Some(libtorch) = std::env::var_os("LIBTORCH").map(PathBuf::from) else {
        println!("cargo:warning=LIBTORCH is not set: run scripts/setup first");
        return;
    };
    let libtorch = libtorch.canonicalize().unwrap_or(libtorch);
    let lib = libtorch.join("lib");
    println!("cargo:rustc-link-search=native={}", lib.display());
    println!("cargo:rustc-link-arg=-Wl,-rpath,{}", lib.display());
    compile_shim(&libtorch);
}

/// Builds `csrc/*.cpp` into a static library linked into every ludus binary.
fn compile_shim(libtorch: &std::path::Path) {
    let include = libtorch.join("include");
    cc::Build::new()
        .cpp(true)
        .pic(true)
        .warnings(false)
        .include(&include)
        .include(include.join("torch/csrc/api/include"))
        .flag("-std=c++17")
        .flag("-D_GLIBCXX_USE_CXX11_ABI=1")
        .flag("-DGLOG_USE_GLOG_EXPORT")
        // The int4 dequantization loops must vectorize even in debug builds (tests prefill
        // through them).
        .opt_level(3)
        .file("csrc/fbgemm_int8.cpp")
        .file("csrc/int4_dequant.cpp")
        .file("csrc/attention_backend.cpp")
        .file("csrc/fused_decode.cpp")
        .compile("ludus_shim");
}
