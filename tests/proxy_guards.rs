//! Guards of the proxy against its own clients and operators' mistakes: the admin API's token.

mod support;

use std::io::{Read, Write};
use std::net::SocketAddr;

use support::client::{tcp, Client};
use support::deadline::within;
use support::mailferry::{command, run_cli, Mailferry, Options};
use support::Backends;

fn start(opts: Options) -> (Backends, Mailferry) {
    let backends = Backends::start();
    let proxy = Mailferry::start(&backends, opts);
    (backends, proxy)
}

/// One HTTP/1.1 request; returns the status code and the whole response.
fn http(
    addr: SocketAddr,
    method: &str,
    path: &str,
    token: Option<&str>,
    body: &str,
) -> (u16, String) {
    let mut s = tcp(addr);
    let auth = token.map_or(String::new(), |t| format!("Authorization: Bearer {t}\r\n"));
    let req = format!(
        "{method} {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n{auth}\
         Content-Type: application/json\r\nContent-Length: {}\r\n\r\n{body}",
        body.len()
    );
    s.write_all(req.as_bytes()).unwrap();
    let mut out = String::new();
    let _ = s.read_to_string(&mut out);
    let status = out
        .split(' ')
        .nth(1)
        .and_then(|c| c.parse().ok())
        .unwrap_or(0);
    (status, out)
}

/// The user as the admin API shows it to an authorized caller.
fn shown(proxy: &Mailferry, user: &str) -> serde_json::Value {
    let path = format!("/api/users/{user}");
    let (status, resp) = http(proxy.admin, "GET", &path, Some(&proxy.token), "");
    assert_eq!(status, 200, "{resp}");
    let body = resp.split("\r\n\r\n").nth(1).unwrap_or_default();
    serde_json::from_str(body).unwrap_or_else(|e| panic!("{e}: {body}"))
}

/// Every state-changing route of `admin::router`, with a body that would change something.
const STATE_CHANGES: [(&str, &str, &str); 3] = [
    ("PUT", "route", r#"{"route":"new"}"#),
    ("POST", "migrate", ""),
    ("PUT", "state", r#"{"state":"cutover"}"#),
];

#[test]
fn admin_api_changes_nothing_without_the_right_token() {
    within(120, || {
        let (_b, proxy) = start(Options::default());
        let user = "alice@example.org";
        let mut live = Client::plain(proxy.imap);
        assert!(live.login(user, "alicepw").starts_with("OK"));
        let t = proxy.token.as_str();
        // Wrong tokens of other lengths, one byte off at the end, and none at all.
        let wrong = [
            Some("wrong-token-of-some-length".to_owned()),
            Some(t[..t.len() - 1].to_owned()),
            Some(format!("{t}x")),
            Some(format!("{}X", &t[..t.len() - 1])),
            Some(String::new()),
            None,
        ];
        for (method, what, body) in STATE_CHANGES {
            let path = format!("/api/users/{user}/{what}");
            for token in &wrong {
                let (status, resp) = http(proxy.admin, method, &path, token.as_deref(), body);
                assert_eq!(status, 401, "{method} {path} with {token:?}: {resp}");
            }
        }
        let view = shown(&proxy, user);
        assert_eq!(view["route"], "legacy", "{view}");
        assert_eq!(view["state"], "legacy", "{view}");
        assert_eq!(view["sessions"], 1, "{view}");
        let (_, ok) = live.cmd("NOOP");
        assert!(
            ok.starts_with("OK"),
            "the live session was not kicked: {ok}"
        );

        // The same requests with the token do change things: the 401s above were the token's.
        let bob = "bob@example.org";
        for (method, what, body) in STATE_CHANGES {
            let path = format!("/api/users/{bob}/{what}");
            let (status, resp) = http(proxy.admin, method, &path, Some(t), body);
            assert_eq!(status, 200, "{method} {path}: {resp}");
        }
        let view = shown(&proxy, bob);
        assert_eq!(view["route"], "new", "{view}");
        assert_eq!(view["state"], "cutover", "{view}");
    })
}

#[test]
fn short_or_empty_admin_tokens_stop_serve_and_fail_check_config() {
    within(120, || {
        let (_b, proxy) = start(Options::default());
        let text = std::fs::read_to_string(&proxy.config).unwrap();
        let good = proxy.config.with_file_name("admin.token");
        for (name, content, why) in [
            ("short.token", "fifteen-bytes-x\n", "15 bytes"),
            ("empty.token", "\n", "empty"),
        ] {
            let file = proxy.config.with_file_name(name);
            std::fs::write(&file, content).unwrap();
            let config = proxy.config.with_file_name(format!("{name}.toml"));
            let replaced = text.replace(&*good.to_string_lossy(), &file.to_string_lossy());
            assert_ne!(replaced, text, "token_file rewritten");
            std::fs::write(&config, replaced).unwrap();

            let out = run_cli(&config, &["check-config"], 30);
            let stdout = String::from_utf8_lossy(&out.stdout);
            assert_eq!(out.status.code(), Some(1), "{stdout}");
            assert!(stdout.contains(name) && stdout.contains(why), "{stdout}");

            // `serve` refuses before binding: the running server holds the same ports.
            let out = command(&config, &["serve"])
                .env("MAILFERRY_LOG", "warn")
                .output()
                .unwrap();
            let stderr = String::from_utf8_lossy(&out.stderr);
            assert_eq!(out.status.code(), Some(2), "{stderr}");
            assert!(stderr.contains(name) && stderr.contains(why), "{stderr}");
        }
        assert!(proxy.cli(&["check-config"]).status.success());
    })
}
