//! Bad model files give errors that name the problem, never panics.

use ludus::inference::gguf::GgufFile;
use ludus::inference::tiny_model::TinySpec;
use ludus::inference::{InferError, Model};
use tch::Device;

use crate::helpers::tiny;

fn load_err(path: &std::path::Path) -> String {
    Model::load(path, Device::Cpu, None).expect_err("must not load").to_string()
}

#[test]
fn truncated_gguf_is_reported_as_truncated() {
    let t = tiny(&TinySpec::default());
    let bytes = std::fs::read(&t.gguf).unwrap();
    for cut in [10, bytes.len() / 3, bytes.len() - 7] {
        let path = t.dir.path().join(format!("cut{cut}.gguf"));
        std::fs::write(&path, &bytes[..cut]).unwrap();
        let err = load_err(&path);
        assert!(err.contains("truncated"), "cut at {cut}: {err}");
    }
}

#[test]
fn not_a_gguf_file_says_so() {
    let dir = tempfile::tempdir().unwrap();
    let path = dir.path().join("x.gguf");
    std::fs::write(&path, b"PK\x03\x04 this is a zip").unwrap();
    assert!(load_err(&path).contains("GGUF magic"));
    assert!(load_err(&dir.path().join("missing.gguf")).to_lowercase().contains("no such file"));
}

#[test]
fn unknown_architecture_is_named() {
    let t = tiny(&TinySpec::default());
    let bytes = std::fs::read(&t.gguf).unwrap();
    let patched = replace_all(&bytes, b"llama", b"bloom");
    let path = t.dir.path().join("bloom.gguf");
    std::fs::write(&path, patched).unwrap();
    let err = Model::load(&path, Device::Cpu, None).unwrap_err();
    assert!(matches!(err, InferError::UnsupportedArchitecture(ref a) if a == "bloom"), "{err}");
}

#[test]
fn unsupported_tensor_type_is_named() {
    let t = tiny(&TinySpec::default());
    let mut bytes = std::fs::read(&t.gguf).unwrap();
    // Tensor info: name, n_dims (u32) = 1, one dim (u64), then the type (u32).
    let name = b"output_norm.weight";
    let at = find(&bytes, name).expect("tensor info present") + name.len() + 4 + 8;
    bytes[at..at + 4].copy_from_slice(&10u32.to_le_bytes()); // Q2_K
    let path = t.dir.path().join("q2_k.gguf");
    std::fs::write(&path, bytes).unwrap();
    let err = GgufFile::open(&path).unwrap_err().to_string();
    assert!(err.contains("output_norm.weight") && err.contains("GGML type 10"), "{err}");
}

#[test]
fn safetensors_with_wrong_byte_range_is_rejected() {
    let t = tiny(&TinySpec::default());
    let file = t.hf.join("model.safetensors");
    let bytes = std::fs::read(&file).unwrap();
    std::fs::write(&file, &bytes[..bytes.len() - 100]).unwrap();
    let err = load_err(&t.hf);
    assert!(err.contains("truncated"), "{err}");
}

fn find(haystack: &[u8], needle: &[u8]) -> Option<usize> {
    haystack.windows(needle.len()).position(|w| w == needle)
}

fn replace_all(bytes: &[u8], from: &[u8], to: &[u8]) -> Vec<u8> {
    let mut out = Vec::with_capacity(bytes.len());
    let mut i = 0;
    while i < bytes.len() {
        if bytes[i..].starts_with(from) {
            out.extend_from_slice(to);
            i += from.len();
        } else {
            out.push(bytes[i]);
            i += 1;
        }
    }
    out
}
