//! The error type of the runtime library.

use std::path::PathBuf;

use sparse_ir::mask_io::{CheckpointError, CheckpointProblem};
use sparse_ir::{BackendError, PatternError, VerifyError};
use thiserror::Error;

/// Everything that can go wrong while building, training, saving or loading a model.
#[derive(Debug, Error)]
pub enum RuntimeError {
    /// A kernel failed to compile or run.
    #[error(transparent)]
    Backend(#[from] BackendError),
    /// A mask could not be turned into a pattern.
    #[error(transparent)]
    Pattern(#[from] PatternError),
    /// A kernel spec broke an invariant.
    #[error(transparent)]
    Verify(#[from] VerifyError),
    /// Shapes or lengths that do not fit together; the message names the layer and the shape.
    #[error("{0}")]
    Shape(String),
    /// A data file is missing, corrupt or truncated.
    #[error("data file {path}: {message}")]
    Data {
        /// The file.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// A checkpoint or weight file is missing, corrupt or does not fit the model.
    #[error("checkpoint {path}: {message}")]
    Checkpoint {
        /// The file or folder.
        path: PathBuf,
        /// What is wrong with it.
        message: String,
    },
    /// An I/O operation failed.
    #[error("{path}: {source}")]
    Io {
        /// The file or folder.
        path: PathBuf,
        /// The operating system's error.
        #[source]
        source: std::io::Error,
    },
    /// The mask update failed.
    #[error(transparent)]
    Masking(#[from] crate::masking::MaskingError),
    /// A configuration value is invalid or not supported.
    #[error("{0}")]
    Config(String),
}

impl RuntimeError {
    /// An I/O error on `path`.
    pub fn io(path: impl Into<PathBuf>, source: std::io::Error) -> Self {
        RuntimeError::Io {
            path: path.into(),
            source,
        }
    }
}

/// A path that leads to no checkpoint: an unreadable `latest` pointer is an I/O error, every
/// other problem a [`RuntimeError::Checkpoint`] naming the path.
impl From<CheckpointError> for RuntimeError {
    fn from(e: CheckpointError) -> Self {
        match e.problem {
            CheckpointProblem::Unreadable(source) => RuntimeError::Io {
                path: e.path,
                source,
            },
            problem => RuntimeError::Checkpoint {
                path: e.path,
                message: problem.to_string(),
            },
        }
    }
}

/// `Result` with [`RuntimeError`].
pub type Result<T, E = RuntimeError> = std::result::Result<T, E>;
