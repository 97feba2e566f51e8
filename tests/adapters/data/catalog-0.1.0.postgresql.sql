-- The catalog schema of lorafleet 0.1.0 (commit a914d3f) on PostgreSQL: the DDL its create_all ran, in its order.
-- Frozen: tests build 0.1.0 catalogs from it, and check that migration 0001 makes the same one.
CREATE TABLE audit_events (
	id SERIAL NOT NULL, 
	at DOUBLE PRECISION NOT NULL, 
	actor VARCHAR(80) NOT NULL, 
	action VARCHAR(32) NOT NULL, 
	tenant VARCHAR(64) NOT NULL, 
	details JSON NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_audit_events_at ON audit_events (at);
CREATE INDEX ix_audit_tenant ON audit_events (tenant, id);
CREATE TABLE rollout_samples (
	id SERIAL NOT NULL, 
	rollout_id INTEGER NOT NULL, 
	step_index INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	unit VARCHAR(16) NOT NULL, 
	ok BOOLEAN NOT NULL, 
	latency_s DOUBLE PRECISION NOT NULL, 
	output_tokens INTEGER NOT NULL, 
	format_valid BOOLEAN, 
	at DOUBLE PRECISION NOT NULL, 
	PRIMARY KEY (id)
);
CREATE INDEX ix_samples_rollout_step ON rollout_samples (rollout_id, step_index);
CREATE TABLE tenants (
	id SERIAL NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	key_hash VARCHAR(64) NOT NULL, 
	sample_inputs BOOLEAN NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (name), 
	UNIQUE (key_hash)
);
CREATE TABLE adapters (
	id SERIAL NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	next_version INTEGER NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (tenant_id, name), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);
CREATE INDEX ix_adapters_tenant_id ON adapters (tenant_id);
CREATE TABLE api_keys (
	id SERIAL NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	key_hash VARCHAR(64) NOT NULL, 
	prefix VARCHAR(16) NOT NULL, 
	label VARCHAR(64) NOT NULL, 
	created_at DOUBLE PRECISION NOT NULL, 
	expires_at DOUBLE PRECISION, 
	revoked_at DOUBLE PRECISION, 
	last_used_at DOUBLE PRECISION, 
	PRIMARY KEY (id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id), 
	UNIQUE (key_hash)
);
CREATE INDEX ix_api_keys_tenant_id ON api_keys (tenant_id);
CREATE TABLE tenant_policies (
	tenant_id INTEGER NOT NULL, 
	limits JSON NOT NULL, 
	disabled_at DOUBLE PRECISION, 
	disabled_reason TEXT NOT NULL, 
	updated_at DOUBLE PRECISION NOT NULL, 
	PRIMARY KEY (tenant_id), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);
CREATE TABLE validation_sets (
	id SERIAL NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	metric VARCHAR(32) NOT NULL, 
	items INTEGER NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (tenant_id, digest, metric), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id)
);
CREATE INDEX ix_validation_sets_tenant_id ON validation_sets (tenant_id);
CREATE TABLE adapter_versions (
	id SERIAL NOT NULL, 
	adapter_id INTEGER NOT NULL, 
	version INTEGER NOT NULL, 
	digest VARCHAR(64) NOT NULL, 
	rank INTEGER NOT NULL, 
	alpha DOUBLE PRECISION NOT NULL, 
	target_modules JSON NOT NULL, 
	size_bytes INTEGER NOT NULL, 
	created_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (adapter_id, version), 
	FOREIGN KEY(adapter_id) REFERENCES adapters (id)
);
CREATE INDEX ix_adapter_versions_adapter_id ON adapter_versions (adapter_id);
CREATE INDEX ix_adapter_versions_digest ON adapter_versions (digest);
CREATE TABLE deployments (
	id SERIAL NOT NULL, 
	tenant_id INTEGER NOT NULL, 
	name VARCHAR(64) NOT NULL, 
	stable_id INTEGER NOT NULL, 
	previous_stable_id INTEGER, 
	rollout_id INTEGER, 
	answer_format JSON, 
	validation_set_id INTEGER, 
	drift_replay_at DOUBLE PRECISION NOT NULL, 
	drift_look_at DOUBLE PRECISION NOT NULL, 
	updated_at TIMESTAMP WITHOUT TIME ZONE NOT NULL, 
	PRIMARY KEY (id), 
	UNIQUE (tenant_id, name), 
	FOREIGN KEY(tenant_id) REFERENCES tenants (id), 
	FOREIGN KEY(stable_id) REFERENCES adapter_versions (id), 
	FOREIGN KEY(previous_stable_id) REFERENCES adapter_versions (id), 
	FOREIGN KEY(validation_set_id) REFERENCES validation_sets (id)
);
CREATE INDEX ix_deployments_tenant_id ON deployments (tenant_id);
CREATE TABLE drift_checks (
	id SERIAL NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	at DOUBLE PRECISION NOT NULL, 
	look INTEGER NOT NULL, 
	p DOUBLE PRECISION NOT NULL, 
	q DOUBLE PRECISION NOT NULL, 
	drifted BOOLEAN NOT NULL, 
	numbers JSON NOT NULL, 
	message TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id), 
	FOREIGN KEY(version_id) REFERENCES adapter_versions (id)
);
CREATE INDEX ix_drift_checks_deployment ON drift_checks (deployment_id, kind);
CREATE TABLE input_samples (
	id SERIAL NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	at DOUBLE PRECISION NOT NULL, 
	features JSON NOT NULL, 
	ok BOOLEAN NOT NULL, 
	output_tokens INTEGER NOT NULL, 
	empty BOOLEAN NOT NULL, 
	format_valid BOOLEAN, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id)
);
CREATE INDEX ix_input_samples_deployment ON input_samples (deployment_id, id);
CREATE TABLE rollouts (
	id SERIAL NOT NULL, 
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
	step_started_at DOUBLE PRECISION NOT NULL, 
	last_look_at DOUBLE PRECISION NOT NULL, 
	last_look_requests INTEGER NOT NULL, 
	created_by VARCHAR(64) NOT NULL, 
	created_at DOUBLE PRECISION NOT NULL, 
	finished_at DOUBLE PRECISION, 
	lease_owner VARCHAR(64), 
	lease_expires DOUBLE PRECISION NOT NULL, 
	revision INTEGER NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id)
);
CREATE INDEX ix_rollouts_deployment_id ON rollouts (deployment_id);
CREATE TABLE validation_runs (
	id SERIAL NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	version_id INTEGER NOT NULL, 
	validation_set_id INTEGER NOT NULL, 
	variant VARCHAR(80) NOT NULL, 
	kind VARCHAR(16) NOT NULL, 
	at DOUBLE PRECISION NOT NULL, 
	engine TEXT NOT NULL, 
	score DOUBLE PRECISION NOT NULL, 
	scores JSON NOT NULL, 
	outputs JSON NOT NULL, 
	output_tokens JSON NOT NULL, 
	exact_match_rate DOUBLE PRECISION NOT NULL, 
	changed BOOLEAN NOT NULL, 
	numbers JSON NOT NULL, 
	message TEXT NOT NULL, 
	PRIMARY KEY (id), 
	FOREIGN KEY(deployment_id) REFERENCES deployments (id), 
	FOREIGN KEY(version_id) REFERENCES adapter_versions (id), 
	FOREIGN KEY(validation_set_id) REFERENCES validation_sets (id)
);
CREATE INDEX ix_runs_deployment_version ON validation_runs (deployment_id, version_id);
CREATE TABLE decisions (
	id SERIAL NOT NULL, 
	deployment_id INTEGER NOT NULL, 
	rollout_id INTEGER, 
	at DOUBLE PRECISION NOT NULL, 
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
