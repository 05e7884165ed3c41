//! The store behaviour suite on the in-memory store.
#![allow(clippy::unwrap_used)] // a test that cannot unwrap has failed

#[tokio::test]
async fn mem_store_has_the_store_behaviour() {
    let store = oco_core::mem::MemStore::new();
    oco_core::testing::store_behaviour(&store).await.unwrap();
}

#[tokio::test]
async fn mem_store_refuses_an_entry_on_a_disabled_account() {
    let store = oco_core::mem::MemStore::new();
    oco_core::testing::inactive_account_behaviour(&store)
        .await
        .unwrap();
}

#[tokio::test]
async fn mem_store_keeps_one_entry_per_idempotency_key() {
    let store = oco_core::mem::MemStore::new();
    oco_core::testing::idempotency_behaviour(&store)
        .await
        .unwrap();
}

#[tokio::test]
async fn mem_store_has_the_lease_behaviour() {
    use oco_core::model::ProtectionConfig;
    use oco_core::ports::{ApiCredentials, NewAccount, Store};
    let store = oco_core::mem::MemStore::new();
    for key in ["a", "b"] {
        store
            .create_account(NewAccount {
                owner: "o".into(),
                exchange: "binance".into(),
                credentials: ApiCredentials {
                    api_key: key.into(),
                    secret: secrecy::SecretString::from("s"),
                },
                protection: ProtectionConfig::DEFAULT,
            })
            .await
            .unwrap();
    }
    oco_core::testing::lease_behaviour(&store).await.unwrap();
}

#[tokio::test]
async fn mem_store_has_the_users_behaviour() {
    let store = oco_core::mem::MemStore::new();
    oco_core::testing::users_behaviour(&store).await.unwrap();
}

#[tokio::test]
async fn mem_store_has_the_coverage_behaviour() {
    let store = oco_core::mem::MemStore::new();
    oco_core::testing::coverage_behaviour(&store).await.unwrap();
}
