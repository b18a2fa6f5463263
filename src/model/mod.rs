//! The domain: references (`reference`), the image stream document (`stream`) and the
//! CloudEvents the engine publishes about it (`event`). No I/O here.

pub mod event;
pub mod reference;
pub mod stream;

pub use event::{Event, EventData};
pub use reference::{
    DEFAULT_NAMESPACE, Digest, ImageRef, RefError, StreamImageRef, StreamName, StreamTagRef,
};
pub use stream::{
    Cause, Condition, HistoryEntry, ImageStream, PolicySpec, Seen, Tag, TagFrom, TagSpec,
};
