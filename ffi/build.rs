//! Generates DPDK bindings with bindgen and compiles the C shim for static-inline functions.
use std::env;
use std::path::PathBuf;

fn main() {
    println!("cargo:rerun-if-changed=shim/shim.c");
    println!("cargo:rerun-if-changed=shim/shim.h");
    println!("cargo:rerun-if-changed=shim/wrapper.h");
    println!("cargo:rerun-if-env-changed=PKG_CONFIG_PATH");

    let dpdk = match pkg_config::Config::new()
        .atleast_version("22.11")
        .probe("libdpdk")
    {
        Ok(lib) => lib,
        Err(e) => {
            eprintln!(
                "error: DPDK >= 22.11 not found through pkg-config ({e}).\n\
                 Install it with: apt-get install -y dpdk-dev libdpdk-dev pkg-config \
                 (or run scripts/install-deps)"
            );
            std::process::exit(1);
        }
    };

    // pkg-config's cflags include `-include rte_config.h` and -march; pass them to both
    // clang (bindgen) and cc so the shim and the bindings agree on struct layouts.
    let cflags = pkg_config::get_variable("libdpdk", "cflags").ok();
    let raw_cflags = std::process::Command::new("pkg-config")
        .args(["--cflags", "libdpdk"])
        .output()
        .ok()
        .and_then(|o| String::from_utf8(o.stdout).ok())
        .or(cflags)
        .unwrap_or_default();
    let flags: Vec<String> = split_flags(&raw_cflags);

    let mut build = cc::Build::new();
    build.file("shim/shim.c").include("shim").opt_level(3);
    for f in &flags {
        build.flag(f);
    }
    build.flag_if_supported("-Wno-deprecated-declarations");
    build.compile("hostplane_dpdk_shim");

    let mut builder = bindgen::Builder::default()
        .header("shim/wrapper.h")
        .clang_arg("-Ishim")
        .allowlist_function("rte_.*")
        .allowlist_type("rte_.*")
        .allowlist_var("RTE_.*")
        .allowlist_function("hp_.*")
        .opaque_type("rte_l2tpv2_combined_msg_hdr")
        .opaque_type("rte_gtp_psc_generic_hdr")
        // Packed/aligned structs bindgen cannot lay out; we never touch their fields.
        .opaque_type("rte_arp_hdr")
        .opaque_type("rte_arp_ipv4")
        .layout_tests(false)
        .derive_default(true)
        .prepend_enum_name(false)
        .generate_comments(false);
    for f in &flags {
        builder = builder.clang_arg(f);
    }
    for p in &dpdk.include_paths {
        builder = builder.clang_arg(format!("-I{}", p.display()));
    }
    let bindings = match builder.generate() {
        Ok(b) => b,
        Err(e) => {
            eprintln!(
                "error: bindgen failed on the DPDK headers ({e}).\n\
                 bindgen needs libclang: apt-get install -y libclang-dev clang"
            );
            std::process::exit(1);
        }
    };
    let out = PathBuf::from(env::var("OUT_DIR").expect("cargo sets OUT_DIR"));
    bindings
        .write_to_file(out.join("bindings.rs"))
        .expect("write bindings.rs to OUT_DIR");
}

/// Splits a pkg-config flag string on whitespace, keeping `-include FILE` together.
fn split_flags(s: &str) -> Vec<String> {
    let mut out = Vec::new();
    let mut it = s.split_whitespace();
    while let Some(f) = it.next() {
        if f == "-include" {
            if let Some(file) = it.next() {
                out.push(f.to_string());
                out.push(file.to_string());
            }
        } else {
            out.push(f.to_string());
        }
    }
    out
}
