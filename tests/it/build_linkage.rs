//! The built binary finds libtorch through its RUNPATH, without LD_LIBRARY_PATH, and does
//! not load libtorch's CUDA backend at start-up (about 400 MiB of resident memory on a
//! machine without a GPU): `inference::cuda` opens it at run time instead.

use std::process::Command;

#[test]
fn the_binary_runs_without_ld_library_path_and_opens_cuda_only_on_demand() {
    let bin = env!("CARGO_BIN_EXE_ludus");
    let Ok(out) = Command::new("readelf").args(["-d", bin]).output() else {
        eprintln!("skipped: readelf is not installed");
        return;
    };
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let runpath = dynamic.lines().find(|l| l.contains("RUNPATH") || l.contains("RPATH")).expect("an rpath to libtorch");
    let lib_dir = runpath.split('[').nth(1).and_then(|s| s.split(']').next()).expect("rpath value");
    assert!(!dynamic.contains("libtorch_cuda.so"), "libtorch_cuda.so is linked at start-up:\n{dynamic}");
    let run = Command::new(bin).arg("--version").env_remove("LD_LIBRARY_PATH").output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
    if std::path::Path::new(lib_dir).join("libtorch_cuda.so").exists() {
        // A CUDA build of libtorch: the backend opens on demand (no GPU needed to open it).
        ludus::inference::cuda::load_backend().expect("libtorch_cuda.so opens at run time");
        // And once open, libtorch may not pick cuDNN's attention (a plan per key length).
        assert!(!ludus::inference::cuda::cudnn_attention_enabled(), "cuDNN attention is still enabled");
    }
    // Without a driver, `--device cuda` says so instead of failing obscurely.
    if !ludus::inference::cuda::driver_present() {
        let err = ludus::inference::DeviceChoice::Cuda(0).resolve().unwrap_err().to_string();
        assert!(err.contains("no NVIDIA driver"), "{err}");
    }
}
