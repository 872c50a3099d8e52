//! Client tokens: who may read and write which conversations, and as which sender.
//!
//! The tokens file is TOML, one `[[token]]` table per token; only the SHA-256 of each token is
//! stored (`printf %s "$TOKEN" | sha256sum`):
//!
//! ```toml
//! [[token]]
//! name = "alice-phone"          # for the log; unique
//! sha256 = "9f86d08188...0a08"  # 64 hex digits
//! scopes = ["read", "write"]    # either or both
//! conversations = ["general"]   # optional: only these conversations
//! sender = "alice"              # optional: writes must use this sender
//! ```

use std::collections::BTreeSet;
use std::path::Path;

use figment::providers::{Format, Toml};
use figment::Figment;
use serde::Deserialize;

use super::sha256;

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct File {
    #[serde(default)]
    token: Vec<RawToken>,
}

#[derive(Deserialize)]
#[serde(deny_unknown_fields)]
struct RawToken {
    name: String,
    sha256: String,
    scopes: Vec<String>,
    conversations: Option<Vec<String>>,
    sender: Option<String>,
}

/// One client token, as the daemon keeps it.
#[derive(Debug, Clone, PartialEq, Eq)]
pub struct Token {
    pub name: String,
    digest: [u8; 32],
    pub read: bool,
    pub write: bool,
    /// `None`: every conversation.
    pub conversations: Option<BTreeSet<String>>,
    /// `Some`: every write must use this sender.
    pub sender: Option<String>,
}

impl Token {
    pub fn may_use(&self, conv_id: &str) -> bool {
        self.conversations
            .as_ref()
            .map_or(true, |c| c.contains(conv_id))
    }
}

/// Every token of the tokens file.
#[derive(Debug, Default)]
pub struct Tokens {
    tokens: Vec<Token>,
}

impl Tokens {
    /// Reads and checks the tokens file; an error names the file and the token.
    pub fn load(path: &Path) -> Result<Tokens, String> {
        let shown = path.display();
        let text = std::fs::read_to_string(path)
            .map_err(|e| format!("{shown}: cannot read the tokens file: {e}"))?;
        Tokens::parse(&text).map_err(|e| format!("{shown}: {e}"))
    }

    pub fn parse(text: &str) -> Result<Tokens, String> {
        let file: File = Figment::from(Toml::string(text))
            .extract()
            .map_err(|e| e.to_string())?;
        let mut tokens = Vec::new();
        let mut names = BTreeSet::new();
        for (i, raw) in file.token.into_iter().enumerate() {
            let which = format!("token {} ({:?})", i + 1, raw.name);
            if raw.name.is_empty() || !names.insert(raw.name.clone()) {
                return Err(format!("{which}: `name` must be set and unique"));
            }
            let digest = sha256::parse_hex(&raw.sha256).ok_or_else(|| {
                format!(
                    "{which}: `sha256` must be 64 hex digits (printf %s \"$TOKEN\" | sha256sum)"
                )
            })?;
            let (mut read, mut write) = (false, false);
            for s in &raw.scopes {
                match s.as_str() {
                    "read" => read = true,
                    "write" => write = true,
                    other => {
                        return Err(format!(
                            "{which}: scope {other:?} is neither \"read\" nor \"write\""
                        ))
                    }
                }
            }
            if !read && !write {
                return Err(format!(
                    "{which}: `scopes` must hold \"read\", \"write\" or both"
                ));
            }
            if let Some(c) = &raw.conversations {
                if let Some(bad) = c.iter().find(|c| crate::api::check_conv_id(c).is_err()) {
                    return Err(format!("{which}: {bad:?} is not a conversation name"));
                }
            }
            if raw.sender.as_deref() == Some("") {
                return Err(format!("{which}: `sender`, when set, must not be empty"));
            }
            tokens.push(Token {
                name: raw.name,
                digest,
                read,
                write,
                conversations: raw.conversations.map(|c| c.into_iter().collect()),
                sender: raw.sender,
            });
        }
        Ok(Tokens { tokens })
    }

    /// The token whose digest matches `presented`. Every stored digest is compared, so the
    /// time taken does not tell which one (if any) matched.
    pub fn find(&self, presented: &[u8]) -> Option<&Token> {
        let digest = sha256::sha256(presented);
        let mut found = None;
        for t in &self.tokens {
            if sha256::digests_equal(&digest, &t.digest) && found.is_none() {
                found = Some(t);
            }
        }
        found
    }

    pub fn len(&self) -> usize {
        self.tokens.len()
    }

    pub fn is_empty(&self) -> bool {
        self.tokens.is_empty()
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn parses_and_finds() {
        let h = sha256::hex(&sha256::sha256(b"s3cret-token"));
        let text = format!(
            "[[token]]\nname = \"a\"\nsha256 = \"{h}\"\nscopes = [\"read\"]\nconversations = [\"general\"]\n\
             [[token]]\nname = \"b\"\nsha256 = \"{}\"\nscopes = [\"read\", \"write\"]\nsender = \"bob\"\n",
            sha256::hex(&sha256::sha256(b"other"))
        );
        let t = Tokens::parse(&text).unwrap();
        assert_eq!(t.len(), 2);
        let a = t.find(b"s3cret-token").unwrap();
        assert_eq!(a.name, "a");
        assert!(a.read && !a.write);
        assert!(a.may_use("general") && !a.may_use("ops"));
        let b = t.find(b"other").unwrap();
        assert_eq!(b.sender.as_deref(), Some("bob"));
        assert!(b.may_use("anything"));
        assert!(t.find(b"nope").is_none());
    }

    #[test]
    fn bad_files_are_named() {
        for (text, want) in [
            ("[[token]]\nname = \"a\"\nsha256 = \"xyz\"\nscopes = [\"read\"]\n", "sha256"),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"\nscopes = [\"admin\"]\n",
                "admin",
            ),
            (
                "[[token]]\nname = \"a\"\nsha256 = \"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"\nscopes = [\"read\"]\nconversations = [\"a b\"]\n",
                "a b",
            ),
            ("[[token]]\nname = \"a\"\nsha256 = \"e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855\"\nscopes = [\"read\"]\nextra = 1\n", "extra"),
        ] {
            let e = Tokens::parse(text).unwrap_err();
            assert!(e.contains(want), "{e}");
        }
    }
}
