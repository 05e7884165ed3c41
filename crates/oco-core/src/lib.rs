//! Domain of ocoguard: money types, symbol rules, TP/SL resolution, leg
//! planning, the entry and leg state machines, the ports (`Exchange`,
//! `UserStream`, `Store`, `Clock`) and the one idempotent routine that every
//! layer calls, [`protect::Protector::protect`].
//!
//! Not here: I/O, tokio, JSON, SQL, or any one exchange. `async` appears only
//! in the port traits and in `protect`, which awaits them.
#![deny(clippy::float_arithmetic)]

pub mod follow;
pub mod ids;
pub mod levels;
pub mod mem;
pub mod model;
pub mod money;
pub mod plan;
pub mod ports;
pub mod protect;
pub mod state;
pub mod symbol;
pub mod testing;

pub use ids::{
    AccountId, ClientOrderId, EntryId, IdScheme, IdempotencyKey, LegIndex, LegKey, OcoClientIds,
    OrderRole,
};
pub use levels::{EntryLevels, LevelPercents, ResolvedLevels, StopKind, resolve_levels};
pub use model::{Account, Entry, Evidence, Fill, Leg, Millis, ProtectionConfig, Source};
pub use money::{MoneyError, Price, Qty, StepSize, TickSize};
pub use plan::{ListBound, Plan, PlanInput, PlannedLeg, Unprotectable, plan_protection};
pub use ports::{
    ApiCredentials, Clock, Exchange, ExchangeError, Store, StoreError, SystemClock, UserStream,
};
pub use protect::{ProtectOutcome, Protector, ProtectorConfig};
pub use state::{EntryStatus, LegState};
pub use symbol::{Asset, Symbol, SymbolRules};
