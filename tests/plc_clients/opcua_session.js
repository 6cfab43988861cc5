// What the PLC-side node-opcua clients here (opcua_cycle.js, opcua_recipe.js) share: the session to the box as a
// PLC opens it (the box's certificate trusted explicitly, Basic256Sha256 Sign&Encrypt, a user), the agent's
// namespace, and one node watched by subscription.
"use strict";
const fs = require("fs");
const path = require("path");
const {
    OPCUAClient, MessageSecurityMode, SecurityPolicy, UserTokenType, AttributeIds, TimestampsToReturn,
    ClientMonitoredItem,
} = require("node-opcua-client");
const { OPCUACertificateManager } = require("node-opcua-certificate-manager");

const NAMESPACE = "urn:uflow-edge:plc";

function out(obj) { process.stdout.write(JSON.stringify(obj) + "\n"); }

// Connects to `endpoint`, opens a session as `userName`, finds the agent's namespace and runs
// `body(session, id)` (`id(name)`: the node id of a variable of that namespace); closes both after, thrown or not.
async function withSession({ endpoint, userName, password, pkiDir, serverCert }, body) {
    // The PLC trusts the box's certificate explicitly (what TIA Portal's certificate manager does).
    const trusted = path.join(pkiDir, "trusted", "certs");
    fs.mkdirSync(trusted, { recursive: true });
    fs.copyFileSync(serverCert, path.join(trusted, "uflow-edge-server.der"));
    const certificateManager = new OPCUACertificateManager({
        rootFolder: pkiDir, automaticallyAcceptUnknownCertificate: false,
    });
    await certificateManager.initialize();
    const client = OPCUAClient.create({
        applicationName: "plc-test-client",
        applicationUri: "urn:plc-test-client",
        securityMode: MessageSecurityMode.SignAndEncrypt,
        securityPolicy: SecurityPolicy.Basic256Sha256,
        endpointMustExist: false,
        clientCertificateManager: certificateManager,
        connectionStrategy: { maxRetry: 2, initialDelay: 200, maxDelay: 1000 },
    });
    await client.connect(endpoint);
    const session = await client.createSession({ type: UserTokenType.UserName, userName, password });
    try {
        const namespaces = await session.readNamespaceArray();
        const ns = namespaces.indexOf(NAMESPACE);
        if (ns < 0) throw new Error(`namespace ${NAMESPACE} not found in ${namespaces}`);
        return await body(session, (name) => `ns=${ns};s=${name}`);
    } finally {
        await session.close();
        await client.disconnect();
    }
}

// Watches `nodeId` by subscription (no polling). Returns once the monitored item is set up:
// `values` gets every notified value in order (the caller may splice it), `changed(ms)` resolves at the next
// notification or after `ms`, whichever comes first, and `subscription` is the caller's to terminate.
async function watch(session, nodeId) {
    const subscription = await session.createSubscription2({
        requestedPublishingInterval: 10, requestedLifetimeCount: 600, requestedMaxKeepAliveCount: 20,
        maxNotificationsPerPublish: 100, publishingEnabled: true, priority: 10,
    });
    const values = [];
    let waiter = null;
    const item = ClientMonitoredItem.create(
        subscription,
        { nodeId, attributeId: AttributeIds.Value },
        { samplingInterval: 0, discardOldest: false, queueSize: 100 },
        TimestampsToReturn.Neither,
    );
    item.on("changed", (dataValue) => {
        values.push(dataValue.value.value);
        if (waiter) waiter();
    });
    await new Promise((resolve) => item.once("initialized", resolve));
    async function changed(ms) {
        await new Promise((resolve) => { waiter = resolve; setTimeout(resolve, ms); });
        waiter = null;
    }
    return { subscription, values, changed };
}

// Runs `main` and exits: 0 when it resolves, 1 with `name: error` on stderr when it throws.
function run(name, main) {
    main().then(() => process.exit(0), (err) => { process.stderr.write(`${name}: ${err.stack || err}\n`); process.exit(1); });
}

module.exports = { NAMESPACE, out, withSession, watch, run };
