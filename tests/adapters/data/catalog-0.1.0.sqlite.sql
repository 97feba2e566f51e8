-- The catalog schema of lorafleet 0.1.0 (commit a914d3f) on SQLite: `.schema` of a catalog made by its create_all.
-- Frozen: tests build 0.1.0 catalogs from it, and check that migration 0001 makes the same one.
CREATE TABLE tenants (
	id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	key_hash VARCHAR(64) NOT NULL, 
	sample_inputs BOOLEAN NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name), 
	UNIQUE (key_hash)
);
CREATE TABLE rollout_samples (
	id INTEGER NOT NULL, 
	rollout_id INTEGER NOT NULL, 
	step_index INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	unit VARCHAR(16) NOT NULL, 
	ok BOOLEAN NOT NULL, 
	latency_s DOUBLE NOT NULL, 
	output_tokens INTEGER NOT NULL, 
	format_valid BOOLEAN, 
	at DOUBLE NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_samples_rollout_step ON rollout_samples (rollout_id, step_index);
CREATE TABLE audit_events (
	id INTEGER NOT NULL, 
	at DOUBLE NOT NULL, 
	actor VARCHAR(80) NOT NULL, 
	action VARCHAR(32) NOT NULL, 
	tenant VARCHAR(64) NOT NULL, 
	details JSON NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_audit_events_at ON audit_events (at);
CREATE INDEX ix_audit_tenant ON audit_events (tenant, id);
CREATE TABLE adapters (
	id INTEGER NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	next_version INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (tenant_id, name), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);
CREATE INDEX ix_adapters_tenant_id ON adapters (tenant_id);
CREATE TABLE validation_sets (
	id INTEGER NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	metric VARCHAR(32) NOT NULL, 
	items INTEGER NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (tenant_id, digest, metric), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);
CREATE INDEX ix_validation_sets_tenant_id ON validation_sets (tenant_id);
CREATE TABLE api_keys (
	id INTEGER NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	key_hash VARCHAR(64) NOT NULL, 
	prefix VARCHAR(16) NOT NULL, 
	label VARCHAR(64) NOT NULL, 
	created_at DOUBLE NOT NULL, 
	expires_at DOUBLE, 
	revoked_at DOUBLE, 
	last_used_at DOUBLE, 
	PRIMARY KEY (id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id), 
	UNIQUE (key_hash)
);
CREATE INDEX ix_api_keys_tenant_id ON api_keys (tenant_id);
CREATE TABLE tenant_policies (
	tenant_id INTEGER NOT NULL, 
	limits JSON NOT NULL, 
	disabled_at DOUBLE, 
	disabled_reason TEXT NOT NULL, 
	updated_at DOUBLE NOT NULL, 
	PRIMARY KEY (tenant_id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);
CREATE TABLE adapter_versions (
	id INTEGER NOT NULL, 
	adapter_id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	rank INTEGER NOT NULL, 
	alpha DOUBLE NOT NULL, 
	target_modules JSON NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	created_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (adapter_id, version), 
	FOREIGN KEY(adapter_id) REFERENCES adapters (id)
);
CREATE INDEX ix_adapter_versions_adapter_id ON adapter_versions (adapter_id);
CREATE INDEX ix_adapter_versions_digest ON adapter_versions (digest);
CREATE TABLE deployments (
	id INTEGER NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	stable_id INTEGER NOT NULL, 
	previous_stable_id INTEGER, 
	rollout_id INTEGER, 
	answer_format JSON, 
	validation_set_id INTEGER, 
	drift_replay_at DOUBLE NOT NULL, 
	drift_look_at DOUBLE NOT NULL, 
	updated_at DATETIME NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (tenant_id, name), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id), 
	FOREIGN KEY(stable_id) REFERENCES adapter_versions (id), 
	FOREIGN KEY(previous_stable_id) REFERENCES adapter_versions (id), 
	FOREIGN KEY(validation_set_id) REFERENCES validation_sets (id)
);
CREATE INDEX ix_deployments_tenant_id ON deployments (tenant_id);
CREATE TABLE rollouts (
	id INTEGER NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	phase VARCHAR(16) NOT NULL, 
	reason VARCHAR(64) NOT NULL, 
	message TEXT NOT NULL, 
	salt VARCHAR(32) NOT NULL, 
	variants JSON NOT NULL, 
	steps JSON NOT NULL, 
	step_index INTEGER NOT NULL, 
	params JSON NOT NULL, 
	gate JSON, 
	looks INTEGER NOT NULL, 
	step_started_at DOUBLE NOT NULL, 
	last_look_at DOUBLE NOT NULL, 
	last_look_requests INTEGER NOT NULL, 
	created_by VARCHAR(64) NOT NULL, 
	created_at DOUBLE NOT NULL, 
	finished_at DOUBLE, 
	lease_owner VARCHAR(64), 
	lease_expires DOUBLE NOT NULL, 
	revision INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id)
);
CREATE INDEX ix_rollouts_deployment_id ON rollouts (deployment_id);
CREATE TABLE validation_runs (
	id INTEGER NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	validation_set_id INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	at DOUBLE NOT NULL, 
	engine TEXT NOT NULL, 
	score DOUBLE NOT NULL, 
	scores JSON NOT NULL, 
	outputs JSON NOT NULL, 
	output_tokens JSON NOT NULL, 
	exact_match_rate DOUBLE NOT NULL, 
	changed BOOLEAN NOT NULL, 
	numbers JSON NOT NULL, 
	message TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id), 
	FOREIGN KEY(version_id) REFERENCES adapter_versions (id), 
	FOREIGN KEY(validation_set_id) REFERENCES validation_sets (id)
);
CREATE INDEX ix_runs_deployment_version ON validation_runs (deployment_id, version_id);
CREATE TABLE input_samples (
	id INTEGER NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	at DOUBLE NOT NULL, 
	features JSON NOT NULL, 
	ok BOOLEAN NOT NULL, 
	output_tokens INTEGER NOT NULL, 
	empty BOOLEAN NOT NULL, 
	format_valid BOOLEAN, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id)
);
CREATE INDEX ix_input_samples_deployment ON input_samples (deployment_id, id);
CREATE TABLE drift_checks (
	id INTEGER NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	at DOUBLE NOT NULL, 
	look INTEGER NOT NULL, 
	p DOUBLE NOT NULL, 
	q DOUBLE NOT NULL, 
	drifted BOOLEAN NOT NULL, 
	numbers JSON NOT NULL, 
	message TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id), 
	FOREIGN KEY(version_id) REFERENCES adapter_versions (id)
);
CREATE INDEX ix_drift_checks_deployment ON drift_checks (deployment_id, kind);
CREATE TABLE decisions (
	id INTEGER NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	rollout_id INTEGER, 
	at DOUBLE NOT NULL, 
	action VARCHAR(16) NOT NULL, 
	reason VARCHAR(64) NOT NULL, 
	message TEXT NOT NULL, 
	step_index INTEGER NOT NULL, 
	actor VARCHAR(80) NOT NULL, 
	numbers JSON NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id), 
	FOREIGN KEY(rollout_id) REFERENCES rollouts (id)
);
CREATE INDEX ix_decisions_deployment_id ON decisions (deployment_id);
CREATE INDEX ix_decisions_rollout_id ON decisions (rollout_id);
