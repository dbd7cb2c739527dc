//! User types named like prelude items, and a module named like the runtime's, do not
//! confuse the expansion.
#![allow(dead_code)]

mod strategy {
    use idem_runtime::{idempotent, MemoryTx};

    pub struct Ok;
    pub struct Some;
    pub enum Option { Nothing }
    pub struct Error;
    pub struct Result;
    pub struct Outcome;

    pub struct Ping {
        pub id: u64,
    }

    #[derive(Debug, thiserror::Error)]
    #[error("app error")]
    pub struct AppError;
    impl idem_runtime::HandlerError for AppError {}

    #[idempotent(key = "id", store = "memory", strategy = "dedup_table", replay)]
    pub async fn on_ping(_tx: &mut MemoryTx, msg: Ping) -> ::core::result::Result<u64, AppError> {
        ::core::result::Result::Ok(msg.id)
    }
}

#[tokio::main(flavor = "current_thread")]
async fn main() {
    let store = idem_runtime::MemoryStore::new();
    let ping = || strategy::Ping { id: 7 };
    assert!(strategy::on_ping(&store, ping(), idem_runtime::NoAck).await.unwrap().is_processed());
    assert!(strategy::on_ping(&store, ping(), idem_runtime::NoAck).await.unwrap().is_duplicate());
}
