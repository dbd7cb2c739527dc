//! Compile-time checks of `#[idempotent]`: every case in `ui/fail` must fail with the message
//! in its `.stderr`, every case in `ui/pass` must compile and run. Regenerate the expected
//! output after an intended change with `TRYBUILD=overwrite cargo test -p idem-tests --test ui`,
//! then read every changed `.stderr`.

#[test]
fn ui() {
    let cases = trybuild::TestCases::new();
    cases.pass("ui/pass/*.rs");
    cases.compile_fail("ui/fail/*.rs");
}
