//! The config file: any file is either refused with an error naming the file (and the key,
//! when the file is TOML at all), or yields a valid config that reads back the same when
//! written out again.
//!
//! `CHATRAFTD_*` variables in the fuzzer's environment take part, as they do for the daemon;
//! run it without them.
#![no_main]

use chatraftd::config::Config;
use libfuzzer_sys::fuzz_target;

const FILE: &str = "/etc/chatraftd/chatraftd.toml";

fuzz_target!(|data: &[u8]| {
    // Config::load refuses a file that is not UTF-8 before it parses anything.
    let Ok(text) = std::str::from_utf8(data) else {
        return;
    };
    match Config::from_toml_str(text, FILE) {
        Err(e) => {
            assert_eq!(e.source, FILE, "{e}");
            assert!(!e.message.is_empty(), "{e:?}");
            let shown = e.to_string();
            assert!(shown.starts_with(FILE), "{shown}");
            if e.key.is_empty() {
                // Only a file that is not TOML at all goes without a key.
                assert!(
                    text.parse::<toml::Table>().is_err(),
                    "no key named: {shown}"
                );
            } else {
                assert!(shown.contains(&format!("`{}`", e.key)), "{shown}");
            }
        }
        Ok(config) => {
            config.validate(FILE).expect("a loaded config is valid");
            // These expect() what validate() checked.
            let _ = (config.api_listen_addr(), config.raft_listen_addr());
            let written = toml::to_string(&config).expect("a config writes out as TOML");
            let back = Config::from_toml_str(&written, FILE)
                .unwrap_or_else(|e| panic!("a written config is refused: {e}\n{written}"));
            assert_eq!(back, config, "{written}");
        }
    }
});
