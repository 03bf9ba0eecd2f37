//! Generates librbd/librados bindings with bindgen and links both libraries.
use std::env;
use std::path::{Path, PathBuf};

const PACKAGES: &str = "librbd-dev librados-dev";

fn main() {
    println!("cargo:rerun-if-changed=wrapper.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    // Debian's librbd-dev/librados-dev ship no .pc files; use pkg-config when a distribution does.
    let mut includes: Vec<PathBuf> = Vec::new();
    let mut found = false;
    for lib in ["librbd", "librados"] {
        if let Ok(l) = pkg_config::Config::new().probe(lib) {
            includes.extend(l.include_paths);
            found = true;
        }
    }
    if !found {
        println!("cargo:rustc-link-lib=rbd");
        println!("cargo:rustc-link-lib=rados");
    }
    let search: Vec<PathBuf> = includes
        .iter()
        .cloned()
        .chain([
            PathBuf::from("/usr/include"),
            PathBuf::from("/usr/local/include"),
        ])
        .collect();
    let has = |h: &str| search.iter().any(|d| d.join(h).is_file());
    for h in ["rbd/librbd.h", "rados/librados.h"] {
        if !has(h) && !Path::new(h).is_file() {
            eprintln!(
                "error: Ceph header <{h}> not found.\n\
                 Install the Ceph client development packages: \
                 apt-get install -y --no-install-recommends {PACKAGES} (or run scripts/install-deps)"
            );
            std::process::exit(1);
        }
    }

    let mut builder = bindgen::Builder::default()
        .header("wrapper.h")
        .allowlist_function("rbd_.*|rados_.*")
        .allowlist_type("rbd_.*|rados_.*")
        .allowlist_var("RBD_.*|LIBRADOS_.*|LIBRBD_.*")
        .layout_tests(false)
        .derive_default(true)
        .prepend_enum_name(false)
        .generate_comments(false);
    for p in &includes {
        builder = builder.clang_arg(format!("-I{}", p.display()));
    }
    let bindings = match builder.generate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "error: bindgen failed on the Ceph headers ({e}).\n\
                 bindgen needs libclang (apt-get install -y libclang-dev clang) and the headers \
                 come from {PACKAGES}"
            );
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs to OUT_DIR");
}
