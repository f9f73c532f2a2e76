//! Who may call: tiers, tenants and their keys, compiled from the policy (and its keys file).
//! Immutable; a reload builds a new one.

use std::collections::hash_map::Entry;
use std::collections::HashMap;
use std::sync::Arc;
use std::time::SystemTime;

use super::keys::{KeyHash, KeyHashMap};
use crate::glob::{any_matches, Glob};

/// What a tier may use. Its limits belong to the limits filter.
#[derive(Debug)]
pub struct Tier {
    pub name: Arc<str>,
    pub routes: Vec<Glob>,
    pub models: Vec<Glob>,
}

impl Tier {
    pub fn allows_route(&self, route: &str) -> bool {
        any_matches(&self.routes, route)
    }

    pub fn allows_model(&self, model: &str) -> bool {
        any_matches(&self.models, model)
    }
}

#[derive(Debug)]
pub struct Tenant {
    pub name: Arc<str>,
    pub tier: Arc<Tier>,
}

#[derive(Debug)]
pub struct KeyRecord {
    pub tenant: Arc<Tenant>,
    pub label: Option<Box<str>>,
    pub expires: Option<SystemTime>,
    pub revoked: bool,
}

#[derive(Debug, Default)]
pub struct Directory {
    tiers: HashMap<Arc<str>, Arc<Tier>>,
    tenants: HashMap<Arc<str>, Arc<Tenant>>,
    keys: KeyHashMap<KeyRecord>,
}

#[derive(Debug, Clone, PartialEq, Eq, thiserror::Error)]
pub enum DirectoryError {
    #[error("tier `{0}` is declared twice")]
    DuplicateTier(String),
    #[error("tenant `{0}` is declared twice")]
    DuplicateTenant(String),
    #[error("unknown tier `{tier}` (declared: {known})")]
    UnknownTier { tier: String, known: String },
    #[error("unknown tenant `{0}`")]
    UnknownTenant(String),
    #[error("this key hash is already given to tenant `{0}`")]
    DuplicateKey(String),
}

impl Directory {
    pub fn is_empty(&self) -> bool {
        self.tenants.is_empty()
    }

    pub fn add_tier(
        &mut self,
        name: &str,
        routes: &[String],
        models: &[String],
    ) -> Result<(), DirectoryError> {
        if self.tiers.contains_key(name) {
            return Err(DirectoryError::DuplicateTier(name.to_owned()));
        }
        let tier = Tier {
            name: name.into(),
            routes: routes.iter().map(|p| Glob::new(p)).collect(),
            models: models.iter().map(|p| Glob::new(p)).collect(),
        };
        self.tiers.insert(tier.name.clone(), Arc::new(tier));
        Ok(())
    }

    pub fn tier(&self, name: &str) -> Option<&Arc<Tier>> {
        self.tiers.get(name)
    }

    /// Room for `tenants` more tenants and `keys` more keys, so a large policy's directory is
    /// built without rehashing.
    pub fn reserve(&mut self, tenants: usize, keys: usize) {
        self.tenants.reserve(tenants);
        self.keys.reserve(keys);
    }

    pub fn add_tenant(&mut self, name: &str, tier: &str) -> Result<(), DirectoryError> {
        if self.tenants.contains_key(name) {
            return Err(DirectoryError::DuplicateTenant(name.to_owned()));
        }
        let tier = self.tier(tier).cloned().ok_or_else(|| {
            let mut known: Vec<&str> = self.tiers.keys().map(|k| &**k).collect();
            known.sort_unstable();
            DirectoryError::UnknownTier {
                tier: tier.to_owned(),
                known: known.join(", "),
            }
        })?;
        let tenant = Tenant {
            name: name.into(),
            tier,
        };
        self.tenants.insert(tenant.name.clone(), Arc::new(tenant));
        Ok(())
    }

    pub fn tenant(&self, name: &str) -> Option<&Arc<Tenant>> {
        self.tenants.get(name)
    }

    pub fn add_key(
        &mut self,
        tenant: &str,
        hash: KeyHash,
        label: Option<&str>,
        expires: Option<SystemTime>,
        revoked: bool,
    ) -> Result<(), DirectoryError> {
        let tenant = self
            .tenant(tenant)
            .cloned()
            .ok_or_else(|| DirectoryError::UnknownTenant(tenant.to_owned()))?;
        match self.keys.entry(hash) {
            Entry::Occupied(existing) => Err(DirectoryError::DuplicateKey(
                existing.get().tenant.name.to_string(),
            )),
            Entry::Vacant(slot) => {
                slot.insert(KeyRecord {
                    tenant,
                    label: label.map(Into::into),
                    expires,
                    revoked,
                });
                Ok(())
            }
        }
    }

    pub fn key(&self, hash: &KeyHash) -> Option<&KeyRecord> {
        self.keys.get(hash)
    }

    pub fn key_count(&self) -> usize {
        self.keys.len()
    }
}
