//! The relay's control socket, `DATA_DIR/control.sock`: how `broker backup` asks a running relay
//! for a consistent copy of its store (a second process cannot open the store while the relay
//! holds it). A Unix socket rather than a port: only the relay's own user can reach it (mode
//! 0600, inside the data directory), and nothing listens on the network for it.
//!
//! One request per connection, one JSON line each way.

use std::io::ErrorKind;
use std::os::unix::fs::PermissionsExt;
use std::path::{Path, PathBuf};
use std::sync::Arc;

use serde::{Deserialize, Serialize};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::{UnixListener, UnixStream};
use tokio_util::sync::CancellationToken;
use tracing::{error, info, warn};

use crate::store::{RedbStore, Store, StoreError};

/// The socket's name inside the data directory.
pub const SOCKET_NAME: &str = "control.sock";

/// The longest request line the relay reads: a request names a path, nothing more.
const MAX_REQUEST_BYTES: u64 = 8192;

/// The socket of the relay running on `data_dir`.
pub fn socket_path(data_dir: &Path) -> PathBuf {
    data_dir.join(SOCKET_NAME)
}

/// What a client asks.
#[derive(Debug, Serialize, Deserialize)]
#[serde(tag = "op", rename_all = "kebab-case")]
pub enum Request {
    /// Write a backup of the store to `out` (an absolute path the relay's user can write).
    Backup { out: PathBuf },
}

/// The relay's answer: `bytes` written, or the `error` that stopped it.
#[derive(Debug, Default, Serialize, Deserialize)]
pub struct Reply {
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub bytes: Option<u64>,
    #[serde(default, skip_serializing_if = "Option::is_none")]
    pub error: Option<String>,
}

#[derive(Debug, thiserror::Error)]
pub enum ControlError {
    #[error(transparent)]
    Store(#[from] StoreError),
    #[error("the relay's control socket {}: {source}", .path.display())]
    Socket {
        path: PathBuf,
        source: std::io::Error,
    },
    #[error("the relay refused: {0}")]
    Refused(String),
    #[error(
        "a relay holds the store in {} but its control socket {} does not answer ({reason}); \
         stop that relay to back up its store offline",
        .data_dir.display(), .socket.display()
    )]
    NoAnswer {
        data_dir: PathBuf,
        socket: PathBuf,
        reason: String,
    },
}

/// Listens on `path` until `stop`; a socket left by a relay that died is replaced (the store's
/// lock, taken before, says no other relay runs on this data directory). A socket that cannot be
/// made is logged and the relay runs without it: backups then need the relay stopped.
pub async fn serve(path: PathBuf, store: Arc<dyn Store>, stop: CancellationToken) {
    let listener = match bind(&path) {
        Ok(l) => l,
        Err(e) => {
            warn!(path = %path.display(), error = %e, "no control socket: `broker backup` works only while the relay is stopped");
            return;
        }
    };
    info!(path = %path.display(), "control socket ready (broker backup)");
    loop {
        let conn = tokio::select! {
            _ = stop.cancelled() => break,
            accepted = listener.accept() => accepted,
        };
        match conn {
            // One at a time: a backup holds the store's writer, two would only queue there.
            Ok((stream, _)) => answer(stream, &store).await,
            Err(e) => warn!(error = %e, "control socket accept failed"),
        }
    }
    let _ = std::fs::remove_file(&path);
}

fn bind(path: &Path) -> std::io::Result<UnixListener> {
    match std::fs::remove_file(path) {
        Err(e) if e.kind() != ErrorKind::NotFound => return Err(e),
        _ => {}
    }
    let listener = UnixListener::bind(path)?;
    std::fs::set_permissions(path, std::fs::Permissions::from_mode(0o600))?;
    Ok(listener)
}

async fn answer(stream: UnixStream, store: &Arc<dyn Store>) {
    let (read, mut write) = stream.into_split();
    let mut line = String::new();
    let mut reader = BufReader::new(tokio::io::AsyncReadExt::take(read, MAX_REQUEST_BYTES));
    let reply = match reader.read_line(&mut line).await {
        Err(e) => Reply {
            error: Some(format!("could not read the request: {e}")),
            ..Reply::default()
        },
        Ok(_) => match serde_json::from_str::<Request>(&line) {
            Err(e) => Reply {
                error: Some(format!("not a control request: {e}")),
                ..Reply::default()
            },
            Ok(Request::Backup { out }) => backup(store.clone(), out).await,
        },
    };
    let mut text = serde_json::to_string(&reply).unwrap_or_else(|_| "{}".into());
    text.push('\n');
    if let Err(e) = write.write_all(text.as_bytes()).await {
        warn!(error = %e, "could not answer on the control socket");
    }
}

async fn backup(store: Arc<dyn Store>, out: PathBuf) -> Reply {
    if !out.is_absolute() {
        return Reply {
            error: Some(format!("{} is not an absolute path", out.display())),
            ..Reply::default()
        };
    }
    let started = std::time::Instant::now();
    let shown = out.display().to_string();
    match tokio::task::spawn_blocking(move || store.backup(&out)).await {
        Ok(Ok(bytes)) => {
            info!(out = %shown, bytes, ms = started.elapsed().as_millis() as u64, "backup written");
            Reply {
                bytes: Some(bytes),
                ..Reply::default()
            }
        }
        Ok(Err(e)) => {
            error!(out = %shown, error = %e, "backup failed");
            Reply {
                error: Some(e.to_string()),
                ..Reply::default()
            }
        }
        Err(e) => Reply {
            error: Some(format!("the backup task failed: {e}")),
            ..Reply::default()
        },
    }
}

/// Writes a backup of the store in `data_dir` to `out`: through the relay running there if there
/// is one, else from the file directly. Returns the bytes written and whether a running relay
/// wrote them.
pub async fn backup_store(data_dir: &Path, out: &Path) -> Result<(u64, bool), ControlError> {
    let out = std::path::absolute(out).map_err(|source| StoreError::Backup {
        path: out.to_owned(),
        source,
    })?;
    let socket = socket_path(data_dir);
    match UnixStream::connect(&socket).await {
        Ok(stream) => ask(stream, &socket, Request::Backup { out })
            .await
            .map(|bytes| (bytes, true)),
        Err(e) if matches!(e.kind(), ErrorKind::NotFound | ErrorKind::ConnectionRefused) => {
            let store = RedbStore::open(data_dir).map_err(|err| match err {
                StoreError::Open { .. } => ControlError::NoAnswer {
                    data_dir: data_dir.to_owned(),
                    socket: socket.clone(),
                    reason: e.to_string(),
                },
                other => other.into(),
            })?;
            let bytes = tokio::task::spawn_blocking(move || store.backup(&out))
                .await
                .map_err(|e| ControlError::Refused(format!("the backup task failed: {e}")))??;
            Ok((bytes, false))
        }
        Err(source) => Err(ControlError::Socket {
            path: socket,
            source,
        }),
    }
}

async fn ask(mut stream: UnixStream, socket: &Path, request: Request) -> Result<u64, ControlError> {
    let io = |source| ControlError::Socket {
        path: socket.to_owned(),
        source,
    };
    let mut text = serde_json::to_string(&request).unwrap_or_default();
    text.push('\n');
    stream.write_all(text.as_bytes()).await.map_err(io)?;
    let mut line = String::new();
    BufReader::new(stream)
        .read_line(&mut line)
        .await
        .map_err(io)?;
    let reply: Reply = serde_json::from_str(&line)
        .map_err(|e| ControlError::Refused(format!("unreadable answer {line:?}: {e}")))?;
    match (reply.bytes, reply.error) {
        (_, Some(error)) => Err(ControlError::Refused(error)),
        (Some(bytes), None) => Ok(bytes),
        (None, None) => Err(ControlError::Refused("an empty answer".into())),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[tokio::test]
    async fn a_running_relay_writes_the_backup_and_bad_requests_get_a_reason() {
        let dir = tempfile::tempdir().unwrap();
        let data = dir.path().join("data");
        let store: Arc<dyn Store> = Arc::new(RedbStore::open(&data).unwrap());
        let stop = CancellationToken::new();
        let server = tokio::spawn(serve(socket_path(&data), store.clone(), stop.clone()));
        let socket = socket_path(&data);
        let deadline = std::time::Instant::now() + std::time::Duration::from_secs(10);
        while !socket.exists() {
            assert!(
                std::time::Instant::now() < deadline,
                "socket never appeared"
            );
            tokio::task::yield_now().await;
        }
        let mode = std::fs::metadata(&socket).unwrap().permissions().mode();
        assert_eq!(mode & 0o777, 0o600);

        let out = dir.path().join("b.redb");
        let (bytes, by_relay) = backup_store(&data, &out).await.unwrap();
        assert!(by_relay);
        assert_eq!(bytes, std::fs::metadata(&out).unwrap().len());

        let stream = UnixStream::connect(&socket).await.unwrap();
        let err = ask(
            stream,
            &socket,
            Request::Backup {
                out: "relative.redb".into(),
            },
        )
        .await
        .unwrap_err();
        assert!(err.to_string().contains("not an absolute path"), "{err}");

        stop.cancel();
        server.await.unwrap();
        assert!(!socket.exists(), "the socket is removed at stop");
        drop(store);
        // No relay: the store is read directly.
        let (_, by_relay) = backup_store(&data, &dir.path().join("c.redb"))
            .await
            .unwrap();
        assert!(!by_relay);
    }
}
