//! The built binary links libtorch_cuda (so CUDA is not silently lost under
//! `--as-needed`) and finds libtorch through its RUNPATH, without LD_LIBRARY_PATH.

use std::process::Command;

#[test]
fn the_binary_keeps_libtorch_cuda_and_runs_without_ld_library_path() {
    let bin = env!("CARGO_BIN_EXE_ludus");
    let Ok(out) = Command::new("readelf").args(["-d", bin]).output() else {
        eprintln!("skipped: readelf is not installed");
        return;
    };
    let dynamic = String::from_utf8_lossy(&out.stdout);
    let runpath = dynamic.lines().find(|l| l.contains("RUNPATH") || l.contains("RPATH")).expect("an rpath to libtorch");
    let lib_dir = runpath.split('[').nth(1).and_then(|s| s.split(']').next()).expect("rpath value");
    if std::path::Path::new(lib_dir).join("libtorch_cuda.so").exists() {
        assert!(dynamic.contains("libtorch_cuda.so"), "libtorch_cuda.so was dropped by the linker:\n{dynamic}");
    }
    let run = Command::new(bin).arg("--version").env_remove("LD_LIBRARY_PATH").output().unwrap();
    assert!(run.status.success(), "{}", String::from_utf8_lossy(&run.stderr));
}
