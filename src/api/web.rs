//! The web page every node serves: `GET /` and `GET /assets/...`.
//!
//! The files live in `src/api/web/` and are compiled into the binary, so the page works on a
//! host with no network beyond the cluster. It is plain HTML, CSS and JavaScript, and it only
//! talks to the node that served it (the API and `GET /api/v1/cluster`). The
//! Content-Security-Policy allows nothing but this origin's own script and style files: no
//! inline script, no inline style attribute, no frames, no remote fetches.

use warp::http::header::{
    HeaderValue, CACHE_CONTROL, CONTENT_SECURITY_POLICY, CONTENT_TYPE, REFERRER_POLICY,
    X_CONTENT_TYPE_OPTIONS, X_FRAME_OPTIONS,
};
use warp::http::StatusCode;
use warp::Filter;

/// One file of the page.
struct Asset {
    body: &'static [u8],
    content_type: &'static str,
}

const INDEX: Asset = Asset {
    body: include_bytes!("web/index.html"),
    content_type: "text/html; charset=utf-8",
};

/// Files under `/assets/`, by name.
const ASSETS: &[(&str, Asset)] = &[
    (
        "app.css",
        Asset {
            body: include_bytes!("web/app.css"),
            content_type: "text/css; charset=utf-8",
        },
    ),
    (
        "app.js",
        Asset {
            body: include_bytes!("web/app.js"),
            content_type: "text/javascript; charset=utf-8",
        },
    ),
    (
        "icon.svg",
        Asset {
            body: include_bytes!("web/icon.svg"),
            content_type: "image/svg+xml",
        },
    ),
];

/// Only this origin's own files; the page's scripts may only call this origin.
const CSP: &str = "default-src 'none'; script-src 'self'; style-src 'self'; img-src 'self'; \
                   connect-src 'self'; base-uri 'none'; form-action 'none'; frame-ancestors 'none'";

pub fn routes() -> impl Filter<Extract = (warp::reply::Response,), Error = warp::Rejection> + Clone
{
    let index = warp::path::end().and(warp::get()).map(|| serve(&INDEX));
    let assets =
        warp::path!("assets" / String)
            .and(warp::get())
            .and_then(|name: String| async move {
                ASSETS
                    .iter()
                    .find(|(n, _)| *n == name)
                    .map(|(_, asset)| serve(asset))
                    .ok_or_else(warp::reject::not_found)
            });
    index.or(assets).unify()
}

fn serve(asset: &'static Asset) -> warp::reply::Response {
    let mut resp = warp::reply::Response::new(asset.body.into());
    *resp.status_mut() = StatusCode::OK;
    let h = resp.headers_mut();
    h.insert(CONTENT_TYPE, HeaderValue::from_static(asset.content_type));
    h.insert(CONTENT_SECURITY_POLICY, HeaderValue::from_static(CSP));
    h.insert(X_CONTENT_TYPE_OPTIONS, HeaderValue::from_static("nosniff"));
    h.insert(X_FRAME_OPTIONS, HeaderValue::from_static("DENY"));
    h.insert(REFERRER_POLICY, HeaderValue::from_static("no-referrer"));
    // The files change only with the binary; revalidating costs one small request.
    h.insert(CACHE_CONTROL, HeaderValue::from_static("no-cache"));
    resp
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn each_file_has_its_type_and_the_policy() {
        for (asset, ty) in std::iter::once((&INDEX, "text/html; charset=utf-8")).chain(
            ASSETS
                .iter()
                .map(|(name, asset)| (asset, expected_type(name))),
        ) {
            let resp = serve(asset);
            assert_eq!(resp.status(), 200);
            assert_eq!(resp.headers()[CONTENT_TYPE], ty);
            assert_eq!(resp.headers()[CONTENT_SECURITY_POLICY], CSP);
            assert_eq!(resp.headers()[X_CONTENT_TYPE_OPTIONS], "nosniff");
        }
    }

    fn expected_type(name: &str) -> &'static str {
        match name.rsplit_once('.').map(|(_, ext)| ext) {
            Some("js") => "text/javascript; charset=utf-8",
            Some("css") => "text/css; charset=utf-8",
            Some("svg") => "image/svg+xml",
            _ => panic!("no type known for {name}"),
        }
    }

    #[test]
    fn the_page_has_no_inline_script_or_style_and_no_remote_url() {
        let html = std::str::from_utf8(INDEX.body).expect("index.html is UTF-8");
        assert!(!html.contains("<script>"), "inline script");
        assert!(!html.contains("style="), "inline style");
        assert!(!has_event_attribute(html), "inline event handler attribute");
        for (name, asset) in ASSETS {
            let text = std::str::from_utf8(asset.body).expect("assets are UTF-8");
            // An SVG names its XML namespace with a URL that is never fetched.
            let text = text.replace("xmlns=\"http://www.w3.org/2000/svg\"", "");
            assert!(
                !text.contains("https://") && !text.contains("http://"),
                "{name} names a remote URL"
            );
            assert!(
                !text.contains("innerHTML"),
                "{name} builds HTML from strings"
            );
        }
    }

    /// True when the HTML has an attribute such as `onclick=`.
    fn has_event_attribute(html: &str) -> bool {
        html.match_indices(" on").any(|(i, _)| {
            let rest = &html[i + 3..];
            let name_len = rest.bytes().take_while(u8::is_ascii_lowercase).count();
            name_len > 0 && rest[name_len..].starts_with('=')
        })
    }
}
