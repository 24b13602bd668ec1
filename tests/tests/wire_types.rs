//! The web app's wire types (`web/src/wire.ts`) are generated from `worker/protocol`; this test fails
//! when the checked-in file is stale. `cargo xtask wire` (or this test with `NIGHTSHIFT_WRITE_WIRE=1`)
//! writes it anew.

use std::path::Path;

#[test]
fn web_wire_types_match_the_protocol_crate() {
    let path = Path::new(env!("CARGO_MANIFEST_DIR")).join("../web/src/wire.ts");
    let expected = nightshift_protocol::typescript::declarations();
    if std::env::var_os("NIGHTSHIFT_WRITE_WIRE").is_some() {
        std::fs::write(&path, &expected).expect("write web/src/wire.ts");
        return;
    }
    let actual = std::fs::read_to_string(&path).unwrap_or_default();
    assert!(
        actual == expected,
        "{} is stale: run `cargo xtask wire` and commit the result",
        path.display()
    );
}
