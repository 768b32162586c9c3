//! Exit codes (RELIABILITY.md): 0 done · 1 internal error · 2 config/usage error ·
//! 64 bad-data budget exceeded. Errors carry their code from the point where it is known.

use std::fmt;

pub struct Exit {
    pub code: i32,
    pub err: anyhow::Error,
}

impl Exit {
    pub fn code(&self) -> i32 {
        self.code
    }
    pub fn usage(err: impl Into<anyhow::Error>) -> Exit {
        Exit {
            code: 2,
            err: err.into(),
        }
    }
    pub fn bad_data(err: impl Into<anyhow::Error>) -> Exit {
        Exit {
            code: 64,
            err: err.into(),
        }
    }
}

/// Anything else is an internal error unless mapped on the way.
impl<E: Into<anyhow::Error>> From<E> for Exit {
    fn from(e: E) -> Exit {
        Exit {
            code: 1,
            err: e.into(),
        }
    }
}

impl fmt::Display for Exit {
    fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
        if f.alternate() {
            write!(f, "{:#}", self.err)
        } else {
            write!(f, "{}", self.err)
        }
    }
}

/// `.usage()?` on any result: tags the error as a config/usage error (exit 2).
pub trait Tag<T> {
    fn usage(self) -> Result<T, Exit>;
}

impl<T, E: Into<anyhow::Error>> Tag<T> for Result<T, E> {
    fn usage(self) -> Result<T, Exit> {
        self.map_err(Exit::usage)
    }
}
