//! Compiles the protobuf definitions under `proto/` with the vendored `protoc`
//! (a `PROTOC` set in the environment wins), and writes the file descriptor
//! set that server reflection serves.

fn main() -> Result<(), Box<dyn std::error::Error>> {
    if std::env::var_os("PROTOC").is_none() {
        // prost-build reads PROTOC; a build script is single-threaded here.
        std::env::set_var("PROTOC", protoc_bin_vendored::protoc_bin_path()?);
    }
    let out_dir = std::path::PathBuf::from(std::env::var("OUT_DIR")?);
    let mut protos = Vec::new();
    for dir in ["proto/keyward/v1", "proto/keyward/provider/v1"] {
        println!("cargo:rerun-if-changed={dir}");
        for entry in std::fs::read_dir(dir)? {
            let path = entry?.path();
            if path.extension().is_some_and(|e| e == "proto") {
                protos.push(path);
            }
        }
    }
    protos.sort();
    tonic_prost_build::configure()
        .file_descriptor_set_path(out_dir.join("keyward_descriptor.bin"))
        // Messages that carry secret material get a hand-written Debug in src/proto.rs.
        .skip_debug([
            "keyward.v1.InitResponse",
            "keyward.v1.UnsealRequest",
            "keyward.v1.PutSecretRequest",
            "keyward.v1.GetSecretResponse",
            "keyward.v1.AppRoleLogin",
            "keyward.v1.OidcLogin",
            "keyward.v1.TokenResponse",
            "keyward.v1.LookupTokenRequest",
            "keyward.v1.RevokeTokenRequest",
            "keyward.v1.CreateSecretIdResponse",
            "keyward.v1.AuditHashRequest",
            "keyward.v1.PkiIssueResponse",
            "keyward.v1.ExchangeTokenRequest",
            "keyward.v1.IdentityTokenResponse",
            "keyward.provider.v1.Secret",
            "keyward.v1.CredsResponse",
            "keyward.v1.ScanMatchRequest",
            "keyward.provider.v1.CreateResponse",
        ])
        .compile_protos(&protos, &[std::path::PathBuf::from("proto")])?;
    Ok(())
}
