//! Webhooks: an HTTP POST of the notification's JSON to a URL. Any 2xx is delivered; anything
//! else (a refused connection, a timeout, a 5xx, a 4xx) is retried by the worker with backoff —
//! a 4xx too, because a receiver being redeployed often answers 404 for a while.

use std::time::Duration;

/// Checks a webhook URL: `http://` or `https://` and a host.
pub fn check_url(url: &str) -> Result<(), String> {
    let parsed =
        reqwest::Url::parse(url).map_err(|e| format!("webhook {url:?} is not a URL: {e}"))?;
    if !matches!(parsed.scheme(), "http" | "https") || parsed.host_str().is_none() {
        return Err(format!(
            "webhook {url:?}: use an http:// or https:// URL with a host"
        ));
    }
    Ok(())
}

/// An HTTP client for webhooks (rustls, the ring provider, the public roots).
pub struct Poster {
    client: reqwest::Client,
}

impl Poster {
    pub fn new(timeout: Duration) -> Result<Poster, String> {
        let client = reqwest::Client::builder()
            .timeout(timeout)
            .connect_timeout(timeout)
            .user_agent(concat!("chukei-broker/", env!("CARGO_PKG_VERSION")))
            .build()
            .map_err(|e| format!("cannot build the webhook HTTP client: {e}"))?;
        Ok(Poster { client })
    }

    /// POSTs `json`; Ok for a 2xx answer.
    pub async fn post(&self, url: &str, json: &str) -> Result<(), String> {
        let response = self
            .client
            .post(url)
            .header(reqwest::header::CONTENT_TYPE, "application/json")
            .body(json.to_owned())
            .send()
            .await
            .map_err(|e| format!("POST {url}: {e}"))?;
        let status = response.status();
        if status.is_success() {
            Ok(())
        } else {
            Err(format!("POST {url}: the receiver answered {status}"))
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use tokio::io::{AsyncReadExt, AsyncWriteExt};

    #[test]
    fn urls_are_checked() {
        assert!(check_url("https://hooks.example.com/x?y=1").is_ok());
        assert!(check_url("http://127.0.0.1:9/x").is_ok());
        for bad in ["ftp://x/y", "hooks.example.com", "http://"] {
            assert!(check_url(bad).is_err(), "{bad}");
        }
    }

    /// A one-shot HTTP server that answers `status` and hands back the request it read.
    async fn sink(status: &'static str) -> (String, tokio::task::JoinHandle<String>) {
        let listener = tokio::net::TcpListener::bind("127.0.0.1:0").await.unwrap();
        let url = format!("http://{}/hook", listener.local_addr().unwrap());
        let task = tokio::spawn(async move {
            let (mut s, _) = listener.accept().await.unwrap();
            let mut buf = Vec::new();
            let mut chunk = [0u8; 4096];
            loop {
                let n = s.read(&mut chunk).await.unwrap();
                buf.extend_from_slice(&chunk[..n]);
                let text = String::from_utf8_lossy(&buf).to_string();
                if let Some(head_end) = text.find("\r\n\r\n") {
                    let len = text[..head_end]
                        .lines()
                        .find_map(|l| {
                            l.to_ascii_lowercase()
                                .strip_prefix("content-length:")
                                .map(|v| v.trim().parse::<usize>().unwrap())
                        })
                        .unwrap_or(0);
                    if buf.len() >= head_end + 4 + len {
                        break;
                    }
                }
                if n == 0 {
                    break;
                }
            }
            let reply =
                format!("HTTP/1.1 {status}\r\ncontent-length: 0\r\nconnection: close\r\n\r\n");
            s.write_all(reply.as_bytes()).await.unwrap();
            String::from_utf8_lossy(&buf).into_owned()
        });
        (url, task)
    }

    #[tokio::test]
    async fn a_post_carries_the_json_and_only_2xx_counts() {
        let poster = Poster::new(Duration::from_secs(5)).unwrap();
        let (url, got) = sink("204 No Content").await;
        poster.post(&url, r#"{"event":"alarm"}"#).await.unwrap();
        let request = got.await.unwrap();
        assert!(request.starts_with("POST /hook HTTP/1.1"), "{request}");
        assert!(
            request
                .to_ascii_lowercase()
                .contains("content-type: application/json")
        );
        assert!(request.ends_with(r#"{"event":"alarm"}"#), "{request}");

        let (url, _got) = sink("503 Service Unavailable").await;
        let e = poster.post(&url, "{}").await.unwrap_err();
        assert!(e.contains("503"), "{e}");
    }
}
