//! The store behaviour suite on the in-memory store.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

#[tokio::test]
async fn mem_store_has_the_store_behaviour() {
    let store = oco_core::mem::MemStore::new();
    oco_core::testing::store_behaviour(&store).await.unwrap();
}
