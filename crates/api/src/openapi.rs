//! The OpenAPI document, generated from the handlers' `#[utoipa::path]`
//! attributes and the DTOs' schemas, served at `/v1/openapi.json`.

use axum::Json;
use utoipa::openapi::security::{Http, HttpAuthScheme, SecurityScheme};
use utoipa::{Modify, OpenApi};

use crate::dto::{
    AccountList, AccountView, CreateAccountRequest, CreateEntryRequest, EntryList, EntryType,
    EntryView, EventView, LatePolicyDto, LegView, Problem, ProtectionSettings, ProtectionView,
    StopSettings, UpdateAccountRequest,
};

/// The API's OpenAPI description.
#[derive(OpenApi)]
#[openapi(
    info(
        title = "ocoguard entry API",
        description = "Place spot BUY entries that are protected by exchange-side SELL OCO orders as soon as they fill. Money is always a string in plain decimal notation."
    ),
    paths(
        crate::accounts::create_account,
        crate::accounts::list_accounts,
        crate::accounts::get_account,
        crate::accounts::update_account,
        crate::entries::create_entry,
        crate::entries::list_entries,
        crate::entries::get_entry,
        crate::entries::cancel_entry,
    ),
    components(schemas(
        Problem, AccountView, AccountList, CreateAccountRequest, UpdateAccountRequest,
        ProtectionSettings, StopSettings, LatePolicyDto, CreateEntryRequest, EntryType,
        EntryView, EntryList, LegView, EventView, ProtectionView,
    )),
    modifiers(&BearerAuth),
    tags(
        (name = "accounts", description = "Exchange accounts and their protection settings"),
        (name = "entries", description = "Entries and their protection"),
    )
)]
pub struct ApiDoc;

struct BearerAuth;

impl Modify for BearerAuth {
    fn modify(&self, openapi: &mut utoipa::openapi::OpenApi) {
        let components = openapi.components.get_or_insert_with(Default::default);
        components.add_security_scheme(
            "bearer",
            SecurityScheme::Http(Http::new(HttpAuthScheme::Bearer)),
        );
    }
}

/// `GET /v1/openapi.json` (no token needed).
pub(crate) async fn openapi_json() -> Json<utoipa::openapi::OpenApi> {
    Json(ApiDoc::openapi())
}
