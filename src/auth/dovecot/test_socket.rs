//! Where the unit tests' scripted auth services listen: a unix socket in a fresh temporary
//! directory of its own, removed on drop.

use std::path::{Path, PathBuf};
use std::sync::atomic::{AtomicU32, Ordering};

use tokio::net::UnixListener;

use super::Endpoint;

pub struct TestSocket {
    pub listener: UnixListener,
    dir: PathBuf,
    path: PathBuf,
}

impl TestSocket {
    /// Binds `<fresh dir>/<name>`.
    pub fn bind(name: &str) -> TestSocket {
        static NEXT: AtomicU32 = AtomicU32::new(0);
        let dir = std::env::temp_dir().join(format!(
            "director-auth-unit-{}-{}",
            std::process::id(),
            NEXT.fetch_add(1, Ordering::Relaxed)
        ));
        let _ = std::fs::remove_dir_all(&dir);
        std::fs::create_dir_all(&dir).unwrap();
        let path = dir.join(name);
        let listener = UnixListener::bind(&path).unwrap();
        TestSocket {
            listener,
            dir,
            path,
        }
    }

    pub fn endpoint(&self) -> Endpoint {
        Endpoint::Unix(self.path.clone())
    }

    /// The socket's directory (for a path where nothing listens).
    pub fn dir(&self) -> &Path {
        &self.dir
    }
}

impl Drop for TestSocket {
    fn drop(&mut self) {
        let _ = std::fs::remove_dir_all(&self.dir);
    }
}
